"""``algm``: Adaptive Local-then-Global token Merging (Norouzi, Orlova, de Geus and Dubbelman, CVPR 2024, "ALGM:
Adaptive Local-then-Global Token Merging for Efficient Semantic Segmentation with Plain Vision Transformers").
Budget = ``threshold``, the local merging threshold. Training-free; variable length; the dense baseline.

Two merging stages, each between the attention and the MLP of one block, following the official code
(tue-mps/algm-segmenter: ``algm/algm/local_merge.py`` ``conditional_pooling``, ``algm/algm/global_merge.py``
``turbo_matching`` and ``algm/algm/patch/algm_segmenter_patch.py`` ``TurboBlock`` / ``apply_patch``):

* **local merging** (the paper's CLAP, "conditional local average pooling") in the first block: the patch grid is
  cut into non-overlapping ``2 x 2`` windows; a window's similarity is the mean cosine similarity of its token
  pairs (self-similarity excluded: ``sum_{i != j} cos(x_i, x_j) / (w (w - 1))``, ``w`` tokens per window), and
  every window whose similarity is ``>= threshold`` becomes one token, the mean of its cells (size-weighted, all
  sizes 1 there), at the window's last (bottom-right) cell. The similarity is computed on the block's tokens
  after the attention residual (the official ``TurboBlock`` passes ``x``, not keys, to both stages; its
  ``TurboAttention`` returns ``q.mean(1)``, which is discarded). New order: ``[merged windows by descending
  similarity, unmerged cells in grid order]``, as the official ``cat([dst, unm])`` after ``topk``;
* **global merging** (the paper's GBM, ToMe's bipartite soft matching) in a middle block: tokens alternate into
  A and B by sequence index (the official ``metric[..., ::2, :]`` with CLS at index 0, so with ``P`` prefix tokens
  patch ``j`` is in A when ``P + j`` is even, as :mod:`lwbench.methods.tome` does), each A token's best cosine
  ``s_i = max_j cos(a_i, b_j)`` over B, and the **adaptive threshold**
  ``tau_g = mean_i(s_i) + std_i(s_i) / l`` (``std`` with Bessel's correction, ``torch.std``; ``l`` the 1-based index
  of the global block, the official ``layer_idx``), computed over the image's A tokens (CLS excluded, as the
  official ``node_max[:, 1:]``). Every A token with ``s_i >= tau_g`` merges into its best B token (size-weighted
  mean, the official ``merge_wavg``), so the number merged is whatever the image's similarity statistics give.
  New order ``[unmerged A in sequence order, B]``;
* tokens are un-merged for the dense output: ``assignment`` maps every grid cell to the token that absorbed it
  and :func:`lwbench.tokens.densify` copies that token to every such cell (the official decoders index their
  outputs with ``source.argmax``);
* defaults as the official training commands: blocks 1 and 5 of 12 (1-based, ``--selected-layers 1 5`` for
  ViT-Ti/S/B; ``1 7`` of 24 for ViT-L), window ``2 x 2`` (``--merging-window-size 2 2``), threshold ``0.88`` (the
  CLI default and the ViT-S ADE20K / Pascal-Context value; ViT-Ti 0.9, ViT-B 0.94, ViT-L 0.95, ViT-S Cityscapes
  0.955). For other depths the global block is ``round(depth / 3)`` (0-based; 4 of 12, the ViT-Ti/S/B ratio).

The budget is the official control: the local ``threshold`` (``--threshold``; a similarity threshold, not a
count: the number of merged tokens adapts to each image). Valid: ``-1 <= threshold <= 1``. ``threshold=1`` is
the no-op: **nothing is merged in either stage** and the model is the plain backbone, bit for bit. The official
code has no such setting (its global stage runs whatever the threshold; the plain model is ``--patch-type pure``),
so ``threshold=1`` is lwbench's switch for it; every ``threshold < 1`` runs both stages as the official code does.
The global stage has no knob of its own in the official code (its threshold is always the adaptive one), nor here,
so even a threshold just below 1 merges: on the quick traffic-signs teacher (``lw_vit_nano_p16``, 15 x 20 grid,
4 blocks, stages in blocks 0 and 1; 128 synthetic test images) ``threshold=0.999`` merges no window but 14% of the
tokens globally, ``0.993`` 34% of the tokens by the last block, ``0.88`` 47%, ``0.38`` 67%, ``-1`` (every window) 73%.

Departures (documented, tested where they matter):

* **Per image, not per batch.** The official code turns each threshold into one count for the batch: the local
  count is ``min`` over images of the windows above threshold, and the global threshold is the batch mean of the
  per-image means plus the batch mean of the per-image stds over ``l``, its count again the ``min`` over images. Here
  every image uses its own windows, statistics and counts, so an image's result does not depend on its
  batch-mates; at batch size 1 (the official speed test) the two agree. Images then keep different numbers of
  tokens: they are packed to the batch maximum and padded, padding is a ``-inf`` key bias in every later attention
  (a float ``attn_mask``: fused attention kept), never merged nor counted in the statistics, zeroed in the output
  and marked in ``TokenOutput.mask``, as :mod:`lwbench.methods.ats` does.
* **Proportional attention is off by default**, as the official code runs: ``apply_patch`` sets ``prop_attn=True``
  and ``TurboBlock`` hands the sizes to ``TurboAttention.forward``, which ignores them (and the other blocks keep
  the plain attention). Option ``prop_attn=true`` adds ``log(size)`` to the attention logits as ToMe does.
* **Any grid**: the official code asserts a square grid divisible by the window. Here windows tile the top-left
  ``floor(H / 2) x floor(W / 2)`` windows; cells of a leftover row or column are never merged locally (they still
  take part in the global stage).
* **Any prefix**: CLS *and* registers are kept out of both stages (the official code protects CLS, and a DeiT
  distillation token). Works for classification too (CLS head), but ALGM is a dense (segmentation) method and
  is documented as lwbench's dense baseline.
* Similarity computations (the windows' pairwise cosines, the bipartite scores) are :class:`Overhead` modules, so
  ``lwbench flops`` books them as selection overhead. RoPE backbones: merged tokens keep their destination's cell
  (the window's last cell, the B token's cell) and its rotary embedding, as :mod:`lwbench.methods.tome` does.
* The paper says the threshold is set automatically from similarity statistics; the official code applies that
  (``mean + std / l``) to the global stage only and takes the local threshold from the command line, per backbone
  and dataset. lwbench follows the code. (The paper's text was not read here, only its abstract and the code.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwbench.errors import ConfigError
from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.vit import num_prefix, to_output

from ._reduction import (
    attention_step,
    call_block,
    cells_per_token,
    check_blocks,
    mlp_residual,
    rope_of,
    start_tokens,
    tokens_per_layer,
)

OFFICIAL_GLOBAL_BLOCK = {12: 4, 24: 6}  # 0-based: --selected-layers 1 5 (ViT-Ti/S/B), 1 7 (ViT-L)


def default_global_block(depth: int, local_block: int = 0) -> int | None:
    """The official global block for 12 and 24 blocks, else ``round(depth / 3)``; None when no block follows the
    local one."""
    g = OFFICIAL_GLOBAL_BLOCK.get(depth, int(depth / 3 + 0.5))
    g = max(g, local_block + 1)
    return g if g < depth else None


def window_cells(grid: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """``(nW, window^2)`` flat cell indices of each non-overlapping window, windows and their cells row-major (the
    last cell is the bottom-right one); windows that would cross the grid's border are left out."""
    gh, gw = grid
    nh, nw = gh // window, gw // window
    r = torch.arange(window, device=device)
    rows = (torch.arange(nh, device=device) * window)[:, None, None, None] + r[None, None, :, None]
    cols = (torch.arange(nw, device=device) * window)[None, :, None, None] + r[None, None, None, :]
    return (rows * gw + cols).reshape(nh * nw, window * window)


def window_similarity(metric: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity (self-pairs excluded) of the tokens in each window: ``(B, N, D)`` tokens in
    grid order, ``(nW, w)`` cells -> ``(B, nW)``."""
    m = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    mw = m[:, cells]  # (B, nW, w, D)
    sims = mw @ mw.transpose(-1, -2)  # (B, nW, w, w)
    w = cells.shape[1]
    off = ~torch.eye(w, dtype=torch.bool, device=metric.device)
    return (sims * off).sum(dim=(-1, -2)) / (w * (w - 1))


def adaptive_threshold(node_max: torch.Tensor, ok: torch.Tensor, layer: int) -> torch.Tensor:
    """ALGM's global threshold per image: ``mean(s) + std(s) / layer`` over the entries of ``(B, T)`` ``node_max``
    where ``ok``, ``std`` unbiased (``torch.std``). NaN (nothing merges) with fewer than two entries."""
    okf = ok.to(node_max.dtype)
    n = okf.sum(dim=1)
    s = torch.where(ok, node_max, torch.zeros_like(node_max))
    mean = s.sum(dim=1) / n
    var = (torch.where(ok, node_max - mean[:, None], torch.zeros_like(node_max)) ** 2).sum(dim=1) / (n - 1)
    thr = mean + var.sqrt() / layer
    return torch.where(n >= 2, thr, torch.full_like(thr, float("nan")))


def combine(x, size, positions, assignment, dest, keep_cell, n_out):
    """Merge tokens: every current token ``t`` of ``(B, T, D)`` ``x`` goes to output slot ``dest[b, t]`` (``>=
    n_out[b]`` for padding), size-weighted; an output token's cell is that of the current token with
    ``keep_cell`` that maps to it. Returns tokens (padding zeroed), sizes ``(B, M, 1)`` (padding 0), positions
    (padding -1), the new assignment and the validity mask, ``M = max(n_out)``."""
    bsz, t, d = x.shape
    # A read-back the padded representation needs: the merged tokens are packed into a (B, max n_out) tensor, whose
    # width is the largest per-image count (data-dependent; padding to a host-side bound would change outputs)
    m = int(n_out.max())
    dest = dest.clamp(max=m)  # slot m collects padding (and is dropped)
    wx = x.new_zeros(bsz, m + 1, d).scatter_add(1, dest.unsqueeze(-1).expand(-1, -1, d), x * size)
    ws = size.new_zeros(bsz, m + 1, 1).scatter_add(1, dest.unsqueeze(-1), size)
    valid = torch.arange(m, device=x.device)[None, :] < n_out[:, None]
    new_size = ws[:, :m]
    new_x = wx[:, :m] / torch.where(valid.unsqueeze(-1), new_size, torch.ones_like(new_size))
    new_x = new_x * valid.unsqueeze(-1).to(new_x.dtype)
    pos = positions.new_full((bsz, m + 1), -1)
    pos.scatter_(1, torch.where(keep_cell, dest, torch.full_like(dest, m)), positions)
    new_pos = torch.where(valid, pos[:, :m], torch.full_like(pos[:, :m], -1))
    return new_x, new_size, new_pos, dest.gather(1, assignment), valid


class LocalMerger(Overhead):
    """ALGM's local stage (CLAP): windows whose mean pairwise cosine is ``>= threshold`` become one token."""

    def __init__(self, threshold: float, window: int = 2):
        super().__init__()
        self.threshold, self.window = float(threshold), int(window)

    def plan(self, metric: torch.Tensor, grid: tuple[int, int]):
        """``(B, N)`` output slot of every cell, ``(B, N)`` cells that keep their cell (unmerged cells and the last
        cell of a merged window), ``(B,)`` tokens out, ``(B, nW)`` window similarity and merge decision."""
        bsz, n, _ = metric.shape
        dev = metric.device
        cells = window_cells(grid, self.window, dev)
        nwin, w = cells.shape
        if nwin == 0:  # grid smaller than a window: nothing to merge
            ar = torch.arange(n, device=dev).expand(bsz, -1)
            empty = metric.new_zeros(bsz, 0)
            return ar, torch.ones_like(ar, dtype=torch.bool), torch.full((bsz,), n, device=dev), empty, empty.bool()
        with torch.no_grad():
            sim = window_similarity(metric, cells)  # (B, nW)
            merge = sim >= self.threshold
            r = merge.sum(dim=1)  # merged windows per image
            key = torch.where(merge, sim, torch.full_like(sim, float("-inf")))
            order = key.argsort(dim=1, descending=True, stable=True)  # merged windows first, most similar first
            ar_w = torch.arange(nwin, device=dev).expand(bsz, -1)
            rank = torch.empty_like(order).scatter_(1, order, ar_w.contiguous())  # window -> its rank
            win_of_cell = torch.full((n,), -1, dtype=torch.long, device=dev)
            win_of_cell[cells.flatten()] = torch.arange(nwin, device=dev).repeat_interleave(w)
            covered = win_of_cell >= 0
            wi = win_of_cell.clamp(min=0).expand(bsz, -1)
            cell_merged = merge.gather(1, wi) & covered
            unm_rank = (~cell_merged).long().cumsum(dim=1) - 1  # grid order among the unmerged cells
            dest = torch.where(cell_merged, rank.gather(1, wi), r[:, None] + unm_rank)
            is_last = torch.zeros(n, dtype=torch.bool, device=dev)
            is_last[cells[:, -1]] = True
            keep_cell = ~cell_merged | is_last
            n_out = n - r * (w - 1)
        return dest, keep_cell, n_out, sim, merge

    def forward(self, x, size, positions, assignment, grid):
        """Merge the ``(B, N, D)`` patch tokens (one per cell, grid order) of the local block."""
        dest, keep_cell, n_out, _, _ = self.plan(x, grid)
        return combine(x, size, positions, assignment, dest, keep_cell, n_out)


class GlobalMerger(Overhead):
    """ALGM's global stage (GBM): bipartite matching, every A token whose best cosine reaches the image's adaptive
    threshold ``mean + std / layer`` merges into its best B token."""

    def __init__(self, layer: int, a_offset: int):
        super().__init__()
        self.layer, self.a_offset = int(layer), int(a_offset)  # layer: the global block, 1-based (official)

    def plan(self, metric: torch.Tensor, valid: torch.Tensor):
        """``(B, T)`` output slot of every token, tokens keeping their cell, ``(B,)`` tokens out, and the A tokens'
        best scores, their threshold and merge decision (for tests and figures)."""
        bsz, t, _ = metric.shape
        dev = metric.device
        ia = torch.arange(self.a_offset, t, 2, device=dev)
        ib = torch.arange(1 - self.a_offset, t, 2, device=dev)
        with torch.no_grad():
            m = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            scores = m[:, ia] @ m[:, ib].transpose(-1, -2)  # (B, Ta, Tb)
            va, vb = valid[:, ia], valid[:, ib]
            scores = scores.masked_fill(~vb[:, None, :], float("-inf"))
            if ib.numel() == 0:
                node_max = scores.new_full((bsz, ia.numel()), float("-inf"))
                node_idx = torch.zeros(bsz, ia.numel(), dtype=torch.long, device=dev)
            else:
                node_max, node_idx = scores.max(dim=-1)
            ok = va & torch.isfinite(node_max)
            thr = adaptive_threshold(node_max, ok, self.layer)
            merge_a = ok & (node_max >= thr[:, None])
            is_unm = torch.zeros(bsz, t, dtype=torch.bool, device=dev)
            is_unm[:, ia] = va & ~merge_a
            is_b = torch.zeros_like(is_unm)
            is_b[:, ib] = vb
            n_unm = is_unm.sum(dim=1)
            trash = torch.full_like(n_unm[:, None], t)
            b_slot = torch.where(is_b, n_unm[:, None] + is_b.long().cumsum(1) - 1, trash)
            slot = torch.where(is_unm, is_unm.long().cumsum(1) - 1, b_slot)  # [unmerged A, B] in sequence order
            dest = slot.clone()
            partner = slot[:, ib].gather(1, node_idx) if ib.numel() else slot[:, ia]
            dest[:, ia] = torch.where(merge_a, partner, slot[:, ia])
            n_out = n_unm + is_b.sum(dim=1)
        return dest, is_unm | is_b, n_out, node_max, thr, merge_a

    def forward(self, x, size, positions, assignment, valid):
        dest, keep_cell, n_out, *_ = self.plan(x, valid)
        return combine(x, size, positions, assignment, dest, keep_cell, n_out)


def key_bias(size: torch.Tensor | None, valid: torch.Tensor | None, num_prefix: int, prop_attn: bool,
             full: bool | None = None):
    """``(B, 1, 1, P + T)`` additive attention bias: ``-inf`` for padding, ``log(size)`` for real tokens with
    ``prop_attn``; None when it would be all zeros. ``full``: whether ``valid`` is all true, when the caller knows
    (None: read from the device)."""
    if size is None or (not prop_attn and (bool(valid.all()) if full is None else full)):
        return None
    s = size.squeeze(-1)
    if prop_attn:
        b = torch.where(valid, s.clamp(min=1e-12).log(), torch.full_like(s, float("-inf")))
    else:
        b = torch.where(valid, torch.zeros_like(s), torch.full_like(s, float("-inf")))
    return torch.cat([b.new_zeros(b.shape[0], num_prefix), b], dim=1)[:, None, None, :]


class ALGMEncoder(nn.Module):
    def __init__(self, vit: nn.Module, threshold: float, local_block: int, global_block: int | None,
                 window: int = 2, prop_attn: bool = False):
        super().__init__()
        self.vit = vit
        self.active = threshold < 1  # threshold = 1: ALGM off, the plain backbone
        self.local_block, self.global_block = int(local_block), global_block
        self.prop_attn = prop_attn
        p = num_prefix(vit)
        self.local = LocalMerger(threshold, window)
        self.glob = GlobalMerger(global_block + 1, a_offset=p % 2) if global_block is not None else None

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz = x.shape[0]
        assignment = positions.clone()
        size, valid = None, torch.ones_like(positions, dtype=torch.bool)
        rope = rope_of(vit, grid)
        counts = []
        full = True  # no padding (yet)
        bias = None  # the attention bias changes only where tokens merge: made there, once per stage
        for i, blk in enumerate(vit.blocks):
            stage = None
            if self.active and i == self.local_block:
                stage = "local"
            elif self.active and self.glob is not None and i == self.global_block:
                stage = "global"
            if stage is None:
                h = call_block(blk, h, rope, bias)
            else:
                h, _, _, _ = attention_step(blk, h, bias, rope, need_v=False, rotated=False)
                if size is None:
                    size = h.new_ones(bsz, h.shape[1] - p, 1)
                if stage == "local":
                    pat, size, positions, assignment, valid = self.local(h[:, p:], size, positions, assignment, grid)
                else:
                    pat, size, positions, assignment, valid = self.glob(h[:, p:], size, positions, assignment, valid)
                h = mlp_residual(blk, torch.cat([h[:, :p], pat], dim=1))
                rope = rope_of(vit, grid, positions)  # padding (-1): identity rotation, and masked as a key
                # One image (latency): valid is all true by construction (width = its count), no read-back; a batch
                # reads once per stage whether any image is padded, to keep the plain attention where none is
                full = bsz == 1 or bool(valid.all())
                bias = key_bias(size, valid, p, self.prop_attn, full)
            counts.append(valid.sum(dim=1))
        sizes = cells_per_token(assignment, h.shape[1] - p)
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device)}
        mask = None if full else valid
        out = to_output(vit, h, positions, grid, assignment=assignment, sizes=sizes, mask=mask, aux=aux)
        if mask is not None:
            out.patches = out.patches * mask.unsqueeze(-1).to(out.patches.dtype)  # padding reads as zeros
        return out


@register_method("algm")
class ALGM(Method):
    description = ("ALGM: local 2x2-window merging above a similarity threshold in the first block, then global "
                   "bipartite merging above an adaptive threshold mid-network (dense baseline)")
    style = ("#dd1c77", r"$\clubsuit$")  # a filled mathtext glyph (the filled letter markers are all taken)
    kind = "reduction"
    budget_key = "threshold"
    budget_type = float
    # 0.88: the official default (ViT-S, ADE20K); quick teacher: 62%, 47%, 38% of the tokens merged; 1 = none
    default_budgets = (0.5, 0.88, 0.99)
    training = "none"
    dense_output = True
    variable_length = True

    @dataclass(frozen=True)
    class Options:
        local_block: int = option(0, "0-based block of the local (window) merging (official: the first)", min=0)
        global_block: int | None = option(None, "0-based block of the global merging (null: 4 of 12, 6 of 24 as the "
                                                "official configs, else round(depth/3))", min=1)
        window: int = option(2, "side of the square local merging window (official 2 x 2)", min=2)
        prop_attn: bool = option(False, "proportional attention, log(size) added to the logits (official: off, the "
                                        "sizes reach TurboAttention but are unused)")

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 1.0  # threshold 1: neither the local nor the global stage merges

    def merge_blocks(self) -> tuple[int, int | None]:
        """``(local block, global block)`` from the options (global ``None``: no block follows the local one, so
        only local merging runs); a ``ConfigError`` when either is not a block of the backbone in that order."""
        depth = self.spec.depth
        lb = self.opts.local_block
        if lb >= depth:
            raise ConfigError(f"algm: option local_block={lb} must be a block index in 0..{depth - 1}")
        gb = self.opts.global_block
        if gb is None:
            return lb, default_global_block(depth, lb)
        if not lb < gb < depth:
            raise ConfigError(f"algm: option global_block={gb} must be a block after local_block={lb}, in "
                              f"{lb + 1}..{depth - 1}")
        return lb, gb

    def check_budget(self):
        self.merge_blocks()
        self._require(-1 <= self.budget <= 1, "threshold in [-1, 1] (cosine similarity of a 2x2 window's tokens; "
                                              "1 = nothing merged, the plain backbone)")

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, "algm")
        lb, gb = self.merge_blocks()
        return ALGMEncoder(vit, self.budget, lb, gb, self.opts.window, self.opts.prop_attn)


__all__ = ["ALGM", "ALGMEncoder", "LocalMerger", "GlobalMerger", "adaptive_threshold", "window_similarity",
           "window_cells", "default_global_block"]
