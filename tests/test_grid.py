"""grid: the lattice cells by hand, k = all cells is the plain model, the same cells for every image."""

from __future__ import annotations

import pytest
import torch

from lwbench.methods.grid import grid_indices, lattice_shape


@pytest.mark.parametrize("h, w, k, cells", [
    (4, 4, 4, [(1, 1), (1, 3), (3, 1), (3, 3)]),       # 2x2 lattice at the centres of 2-cell strips
    (4, 4, 1, [(2, 2)]),                               # one point: the centre cell
    (2, 6, 3, [(1, 1), (1, 3), (1, 5)]),               # r = round(sqrt(3 * 2 / 6)) = 1 row, 3 columns
    (15, 20, 12, [(y, x) for y in (2, 7, 12) for x in (2, 7, 12, 17)]),  # the quick grid: 3x4 lattice
    (3, 3, 5, None),                                   # a lattice thinned to k: worked below
])
def test_lattice_cells_by_hand(h, w, k, cells):
    if (h, w, k) == (3, 3, 5):
        # r = round(sqrt(5)) = 2, c = ceil(5 / 2) = 3: rows int(0.75)=0, int(2.25)=2; cols 0, 1, 2;
        # lattice points (row-major) 0 1 2 6 7 8, keep floor(t * 6 / 5) for t=0..4 -> points 0,1,2,3,4
        assert lattice_shape(3, 3, 5) == (2, 3)
        cells = [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
    got = grid_indices(h, w, k).tolist()
    assert got == sorted(y * w + x for y, x in cells)


@pytest.mark.parametrize("h, w", [(1, 1), (4, 6), (15, 20), (16, 24), (7, 3)])
def test_every_k_gives_k_distinct_sorted_cells_and_all_cells_at_the_top(h, w):
    for k in range(1, h * w + 1):
        idx = grid_indices(h, w, k)
        assert idx.numel() == k and idx.unique().numel() == k and bool((idx[1:] > idx[:-1]).all())
        assert int(idx.min()) >= 0 and int(idx.max()) < h * w
    assert grid_indices(h, w, h * w).tolist() == list(range(h * w))


def test_out_of_range_k_is_refused():
    with pytest.raises(ValueError, match="outside 1..12"):
        grid_indices(3, 4, 13)


def test_spread_covers_the_frame_better_than_a_corner():
    """The lattice's cells span the whole grid: rows and columns from the first to the last quarter."""
    idx = grid_indices(15, 20, 19)
    rows, cols = idx // 20, idx % 20
    assert int(rows.min()) < 4 and int(rows.max()) > 11 and int(cols.min()) < 5 and int(cols.max()) > 15


def test_encoder_uses_the_same_cells_for_every_image():
    from _toy import make

    from lwbench.methods.grid import GridPatchEncoder

    vit, _ = make()
    enc = GridPatchEncoder(vit, 3).eval()
    x = torch.randn(2, 3, 32, 48)
    out = enc(x)
    assert out.patches.shape[1] == 3
    assert torch.equal(out.positions[0], out.positions[1])
