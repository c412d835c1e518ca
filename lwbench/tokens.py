"""The one token representation every method returns, and the one way back to a dense grid.

Methods differ in which tokens survive (kept, merged, sampled, selected before the backbone),
but heads should not care. Every model therefore returns a :class:`TokenOutput`; classification
heads read the prefix (CLS), dense heads call :func:`densify`, which is the LookWhere rule:
kept tokens are copied to their grid cell, merged tokens are copied to every cell they absorbed
(ToMe's source map), and every remaining cell is filled by inverse-distance weighting over its
nearest located tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class TokenOutput:
    """Final (post-norm) tokens of a ViT-like encoder on a high-res patch grid.

    Attributes:
        prefix: ``(B, P, D)`` CLS followed by register tokens. Never pruned or merged.
        patches: ``(B, M, D)`` surviving patch tokens (M <= H*W; padded when ``mask`` is given).
        positions: ``(B, M)`` long, flat index (row-major) of each token's cell on the ``grid``;
            for merged tokens the cell of one of its sources; ``-1`` for tokens with no location
            (EViT's fused token, padding).
        grid: ``(H, W)`` of the high-res patch grid the positions refer to.
        assignment: optional ``(B, H*W)`` long: for each grid cell, the index into ``patches`` of
            the token that absorbed it, ``-1`` if the cell was dropped. Set by merging methods.
        sizes: optional ``(B, M)`` number of grid cells each token stands for.
        mask: optional ``(B, M)`` bool, False for padding (variable-length methods).
        keep: optional ``(B, M)`` float straight-through keep decisions, during training only (DynamicViT): 1 for a
            token kept, 0 for one dropped but still present, with gradients. Pooling heads pool exactly as with
            ``mask = keep > 0.5`` and pass the task loss back to the decisions (:func:`lwbench.heads.pool_patches`).
        aux: method-specific extras for losses and figures (selector maps, keep decisions).
    """

    prefix: torch.Tensor
    patches: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int]
    assignment: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> torch.Tensor:
        return self.prefix[:, 0]

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def valid(self) -> torch.Tensor:
        """``(B, M)`` bool: tokens that are real and located on the grid."""
        ok = self.positions >= 0
        return ok & self.counted() if self.mask is not None or self.keep is not None else ok

    def counted(self) -> torch.Tensor:
        """``(B, M)`` bool: tokens that are neither padding nor dropped by a straight-through ``keep``."""
        ok = torch.ones(self.patches.shape[:2], dtype=torch.bool, device=self.patches.device)
        if self.mask is not None:
            ok = ok & self.mask
        return ok & (self.keep.detach() > 0.5) if self.keep is not None else ok

    def realised_tokens(self) -> torch.Tensor:
        """``(B,)`` number of patch tokens actually processed (excluding padding and dropped tokens)."""
        if self.mask is None and self.keep is None:
            return torch.full((self.patches.shape[0],), self.patches.shape[1], device=self.patches.device)
        return self.counted().sum(1)

    def processed_cells(self) -> torch.Tensor:
        """``(B, H*W)`` bool: grid cells whose own pixels reached the backbone's last block, i.e. cells of a
        kept token or absorbed by a merged one (``assignment``). EViT's fused token and padding locate no cell."""
        b, n = self.positions.shape[0], self.num_cells
        out = torch.zeros(b, n + 1, dtype=torch.bool, device=self.positions.device)
        pos = torch.where(self.valid(), self.positions, torch.full_like(self.positions, n)).clamp(0, n)
        out.scatter_(1, pos, True)
        out = out[:, :n]
        if self.assignment is not None:
            out |= self.assignment >= 0
        return out

    def replace(self, **kw) -> TokenOutput:
        return replace(self, **kw)


def grid_coords(grid: tuple[int, int], device=None) -> torch.Tensor:
    """``(H*W, 2)`` float (row, col) of every cell, row-major."""
    h, w = grid
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([rows, cols], dim=1).float()


def selection_order(out: TokenOutput) -> torch.Tensor:
    """``(B, M)`` token indices in selection-score order (highest ``aux["where_map"]`` at the token's cell first,
    a stable sort, so equal scores keep token order); the identity order without a where-map."""
    b, m = out.positions.shape
    scores = out.aux.get("where_map") if isinstance(out.aux, dict) else None
    ident = torch.arange(m, device=out.positions.device).expand(b, m)
    if scores is None or scores.shape != (b, out.num_cells):
        return ident
    s = torch.gather(scores.detach().float(), 1, out.positions.clamp(min=0))
    s = s.masked_fill(~out.valid(), float("-inf"))
    return torch.sort(-s, dim=1, stable=True).indices


def densify(out: TokenOutput, num_neighbors: int = 5) -> torch.Tensor:
    """Put the tokens back on the full ``(B, H*W, D)`` grid.

    Cells covered by a token (kept, or absorbed by a merged token) get that token exactly; every
    other cell gets the inverse-distance-weighted mean of its ``num_neighbors`` nearest located
    tokens (LookWhere's rule, weights ``1/d`` over grid distance, normalised).

    Ties in distance (the 5th and 6th nearest equally far) go as in the official JAX pretraining: to the
    token first in selection-score order (a stable sort of the distances over score-ordered tokens). The
    scores are ``out.aux["where_map"]`` (LookWhere's map over cells) at the tokens' cells when present,
    else the tokens' own order. At 518 px the other choice changed 8-22% of the filled cells.
    """
    b, m, d = out.patches.shape
    n = out.num_cells
    device = out.patches.device
    valid = out.valid()

    # Which token covers each cell, -1 where none does.
    if out.assignment is not None:
        cover = out.assignment.clone()
    else:
        cover = torch.full((b, n), -1, dtype=torch.long, device=device)
        pos = torch.where(valid, out.positions, torch.full_like(out.positions, n))  # n = trash cell
        tok = torch.arange(m, device=device).expand(b, m)
        trash = torch.full((b, n + 1), -1, dtype=torch.long, device=device)
        trash.scatter_(1, pos, tok)
        cover = trash[:, :n]

    covered = cover >= 0
    dense = torch.gather(out.patches, 1, cover.clamp(min=0).unsqueeze(-1).expand(b, n, d))
    if bool(covered.all()):
        return dense

    # Inverse-distance fill for the uncovered cells from the nearest located tokens.
    coords = grid_coords(out.grid, device)  # (N, 2)
    tok_xy = coords[out.positions.clamp(min=0)]  # (B, M, 2)
    dist = torch.cdist(coords.expand(b, n, 2), tok_xy)  # (B, N, M)
    dist = dist.masked_fill(~valid.unsqueeze(1), float("inf"))
    kk = min(num_neighbors, m)
    order = selection_order(out)  # (B, M): token indices, best selection score first
    dist_o = torch.gather(dist, 2, order.unsqueeze(1).expand(b, n, m))
    sorted_d, sorted_i = torch.sort(dist_o, dim=2, stable=True)  # equal distances keep the score order
    near_d = sorted_d[..., :kk]
    near_i = torch.gather(order.unsqueeze(1).expand(b, n, m), 2, sorted_i[..., :kk])  # (B, N, kk)
    weights = 1.0 / near_d.clamp(min=1e-6)
    weights = weights.masked_fill(torch.isinf(near_d), 0.0)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    neigh = torch.gather(out.patches, 1, near_i.reshape(b, n * kk, 1).expand(b, n * kk, d)).reshape(b, n, kk, d)
    filled = (weights.unsqueeze(-1).to(neigh.dtype) * neigh).sum(2)
    return torch.where(covered.unsqueeze(-1), dense, filled)
