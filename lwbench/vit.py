"""The one seam that mirrors timm's ``VisionTransformer.forward_features`` order, used by every method.

These helpers call timm's own modules (patch embedding weights, blocks, norm) and only do the
bookkeeping timm does not: embedding a *subset* of patches, gathering their position
embeddings, and packaging the result as a :class:`TokenOutput`. Reduction methods' per-block
order (attention, then the method's step, then the MLP) lives in ``methods/_reduction.py``.
Both are tested against timm (``tests/test_vit_seam.py``). :class:`FullEncoder` (timm's own
forward, split into prefix and patches) is here because the core needs it: the teacher is one.

Two timm classes go through it, told apart by class, never by name (:func:`family_of`): every
``VisionTransformer`` (DeiT, AugReg, MAE, CLIP, SigLIP without a class token, DINOv2 with or without
registers) and the RoPE ``Eva`` (DINOv3, EVA-02). What the Eva does differently (a rotary position
embedding handed to every block, indexed at the kept cells for a subset of tokens) lives in
:mod:`lwbench.eva`; the functions here dispatch to it, so methods call one seam for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lwbench import eva
from lwbench.tokens import TokenOutput

# family -> what it covers; ``BackboneSpec.family`` is one of these, methods list the ones they support.
FAMILIES: dict[str, str] = {
    "vit": "timm VisionTransformer with a class token: DeiT, AugReg vit_*, MAE, CLIP, DINOv2 (+registers)",
    "vit-noclass": "timm VisionTransformer without a class token: SigLIP (global_pool='map')",
    "eva": "timm Eva with RoPE and a class token: DINOv3 vit_*_dinov3, EVA-02 eva02_*",
    "eva-noclass": "timm Eva without a class token",
}


def family_problem(model: nn.Module) -> str | None:
    """Why ``model`` is not a backbone lwbench supports (one clause), or None."""
    from timm.layers import PatchEmbed

    if type(model) is not VisionTransformer and not (eva.is_eva(model) and type(model) is eva.Eva):
        return f"a timm {type(model).__name__}"
    pe = getattr(model, "patch_embed", None)
    if type(pe) is not PatchEmbed or not isinstance(getattr(pe, "proj", None), nn.Conv2d):
        return f"a {type(model).__name__} with a {type(pe).__name__} patch embedding (not timm's PatchEmbed)"
    if eva.is_eva(model):
        why = eva.unsupported_variant(model)
        if why:
            return f"an Eva whose {why.removeprefix('it has ')} lwbench does not support"
    return None


def family_of(model: nn.Module) -> str:
    """``"vit"``, ``"vit-noclass"``, ``"eva"`` or ``"eva-noclass"`` (see :data:`FAMILIES`), by class."""
    why = family_problem(model)
    if why:
        from lwbench.errors import UnknownNameError

        raise UnknownNameError(f"backbone is {why}; lwbench supports families {', '.join(FAMILIES)}")
    base = "eva" if eva.is_eva(model) else "vit"
    return base if model.cls_token is not None else f"{base}-noclass"


def patch_size(vit: VisionTransformer) -> int:
    return int(vit.patch_embed.patch_size[0])


def grid_of(vit: VisionTransformer, x: torch.Tensor) -> tuple[int, int]:
    p = patch_size(vit)
    return (x.shape[-2] // p, x.shape[-1] // p)


def num_prefix(vit: VisionTransformer) -> int:
    return int(vit.num_prefix_tokens)


def patch_pos_embed(vit: VisionTransformer, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Position embeddings resampled to ``grid``: (prefix part or None, ``(1, H*W, D)`` patch part, or None when
    the model has no absolute position embedding)."""
    pe = vit.pos_embed
    if pe is None:  # RoPE only (DINOv3)
        return None, None
    n_pre = 0 if vit.no_embed_class else vit.num_prefix_tokens
    pre, pat = pe[:, :n_pre], pe[:, n_pre:]
    if tuple(vit.patch_embed.grid_size) != tuple(grid):
        pat = resample_abs_pos_embed(pat, new_size=grid, old_size=vit.patch_embed.grid_size, num_prefix_tokens=0)
    return (pre if n_pre else None), pat


def prefix_tokens(vit: VisionTransformer, batch: int) -> torch.Tensor:
    """CLS + registers, ``(B, P, D)``, with their position embedding if the model has one (``P`` may be 0: SigLIP)."""
    parts = []
    if vit.cls_token is not None:
        parts.append(vit.cls_token.expand(batch, -1, -1))
    if vit.reg_token is not None:
        parts.append(vit.reg_token.expand(batch, -1, -1))
    if not parts:
        return vit.patch_embed.proj.weight.new_zeros(batch, 0, vit.embed_dim)
    pre = torch.cat(parts, dim=1)
    if not vit.no_embed_class and vit.pos_embed is not None:
        pre = pre + vit.pos_embed[:, : vit.num_prefix_tokens]
    return pre


def patchify(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, C*p*p)`` raw pixel patches, row-major, in conv weight order."""
    p = patch_size(vit)
    return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)


def patch_cells(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p, W/p, C, p, p)``: the grid's patches as a view (no copy), rows and columns of
    the grid first; pixels past the last whole patch are dropped, as the patch embedding's stride drops them."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    return x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)


def gather_patches(vit: VisionTransformer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The raw pixels of the patches ``idx`` ``(B, K)`` only: ``patchify(vit, x)`` gathered at ``idx``, bit for bit,
    without unfolding the whole image first (a view plus an index copies K patches; at batch 1 on 240x320 it
    took 0.13 ms where unfold + gather took 1.26 ms, a fifth of LookWhere's whole forward)."""
    p = patch_size(vit)
    b, c = x.shape[:2]
    cells = patch_cells(x, p)  # (B, gh, gw, C, p, p)
    gw = cells.shape[2]
    rows, cols = torch.div(idx, gw, rounding_mode="floor"), idx % gw
    picked = cells[torch.arange(b, device=x.device).unsqueeze(1), rows, cols]  # (B, K, C, p, p)
    return picked.reshape(b, idx.shape[1], c * p * p)


def embed_patches(vit: VisionTransformer, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Patch embedding (+ position embedding) of all patches, or only of ``idx`` ``(B, K)``.

    With ``idx`` only the selected pixels are projected (as LookWhere's extractor does), using the
    patch-embedding convolution's own weights as a linear map.
    """
    grid = grid_of(vit, x)
    _, pos = patch_pos_embed(vit, grid)
    if idx is not None and idx.shape[1] == grid[0] * grid[1]:
        # Every patch is kept: timm's own convolution, then reorder. Bit-identical to the plain model.
        tok = embed_patches(vit, x)
        return torch.gather(tok, 1, idx.unsqueeze(-1).expand(-1, -1, tok.shape[-1]))
    if idx is None:
        tok = vit.patch_embed(x)  # (B, H, W, D) or (B, N, D) depending on timm flags
        tok = tok.reshape(x.shape[0], -1, tok.shape[-1])
        if pos is not None:
            tok = tok + pos
    else:
        proj = vit.patch_embed.proj
        pix = gather_patches(vit, x, idx)
        tok = F.linear(pix, proj.weight.flatten(1), proj.bias)
        tok = vit.patch_embed.norm(tok)
        if pos is None:
            return tok
        tok = tok + pos.expand(x.shape[0], -1, -1).gather(1, idx.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
    return tok


def assemble(vit: VisionTransformer, patch_tokens: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Prefix + patch tokens through timm's pos_drop / patch_drop / norm_pre, ready for the blocks.

    ``prefix`` replaces the model's own CLS/register tokens (LookWhere hands the extractor the selector's)."""
    if prefix is None:
        prefix = prefix_tokens(vit, patch_tokens.shape[0])
    x = torch.cat([prefix, patch_tokens], dim=1)
    x = vit.pos_drop(x)
    if vit.patch_drop is not None:  # an Eva without patch dropout has None (with it: refused, family_problem)
        x = vit.patch_drop(x)
    return vit.norm_pre(x)


def rope_of(vit: nn.Module, grid, positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """RoPE for patch tokens at ``positions`` ``(B, K)`` (None: all cells in grid order); None without RoPE."""
    return eva.rope_of(vit, tuple(grid), positions)


def run_blocks(vit: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """All blocks, as ``forward_features`` calls them: ``vit.blocks(x)`` for a VisionTransformer; for an Eva
    each block with ``rope`` (:func:`rope_of`)."""
    if eva.is_eva(vit):
        return eva.run_blocks(vit, x, rope)
    return vit.blocks(x)


def call_block(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One block as timm calls it, with ``rope`` when the model has one (an Eva's blocks take it)."""
    if rope is None:
        return blk(x, attn_mask=attn_mask)
    return blk(x, rope=rope, attn_mask=attn_mask)


def to_output(vit: VisionTransformer, x: torch.Tensor, positions: torch.Tensor, grid, **kw) -> TokenOutput:
    """Final norm and split into prefix / patches."""
    x = vit.norm(x)
    p = num_prefix(vit)
    return TokenOutput(prefix=x[:, :p], patches=x[:, p:], positions=positions, grid=tuple(grid), **kw)


def run_tokens(vit: VisionTransformer, patch_tokens: torch.Tensor, positions: torch.Tensor, grid,
               prefix: torch.Tensor | None = None, **kw) -> TokenOutput:
    """The whole backbone (blocks, final norm) on a chosen set of embedded patch tokens ``(B, K, D)``.

    ``positions`` ``(B, K)`` are their grid cells (an Eva's RoPE is indexed there); ``prefix`` and ``kw`` as for
    :func:`assemble` / :func:`to_output`."""
    x = run_blocks(vit, assemble(vit, patch_tokens, prefix=prefix), rope_of(vit, grid, positions))
    return to_output(vit, x, positions, grid, **kw)


def run_selected(vit: VisionTransformer, x: torch.Tensor, idx: torch.Tensor, prefix: torch.Tensor | None = None,
                 **kw) -> TokenOutput:
    """The backbone on the patches ``idx`` ``(B, K)`` of ``x`` only: selection methods after they have chosen.

    Only the selected pixels are embedded; ``idx`` sorted by cell makes k = all patches the plain model."""
    return run_tokens(vit, embed_patches(vit, x, idx), idx, grid_of(vit, x), prefix=prefix, **kw)


def all_positions(batch: int, grid, device) -> torch.Tensor:
    return torch.arange(grid[0] * grid[1], device=device).expand(batch, -1)


class FullEncoder(nn.Module):
    """timm's own ``forward_features`` (fused attention, its norm), split into prefix and patches."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> TokenOutput:
        feats = self.vit.forward_features(x)
        p = num_prefix(self.vit)
        grid = grid_of(self.vit, x)
        return TokenOutput(feats[:, :p], feats[:, p:], all_positions(x.shape[0], grid, x.device), grid)
