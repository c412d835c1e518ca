from __future__ import annotations

import torch

from lwbench.tokens import TokenOutput, densify


def _out(patches, positions, grid, **kw):
    b = patches.shape[0]
    return TokenOutput(prefix=torch.zeros(b, 1, patches.shape[-1]), patches=patches, positions=positions,
                       grid=grid, **kw)


def test_densify_all_kept_is_identity_in_grid_order():
    x = torch.randn(2, 6, 4)
    perm = torch.tensor([[5, 3, 1, 0, 2, 4], [0, 1, 2, 3, 4, 5]])
    shuffled = torch.gather(x, 1, perm.unsqueeze(-1).expand(-1, -1, 4))
    dense = densify(_out(shuffled, perm, (2, 3)))
    assert torch.equal(dense, x)


def test_densify_idw_known_values():
    # 1x5 grid, tokens at cells 0 (value 0) and 4 (value 8); cell 1 is at distance 1 and 3 -> weights 1, 1/3.
    patches = torch.tensor([[[0.0], [8.0]]])
    dense = densify(_out(patches, torch.tensor([[0, 4]]), (1, 5)))
    w = torch.tensor([1.0, 1 / 3])
    expect1 = (w * torch.tensor([0.0, 8.0])).sum() / w.sum()
    assert torch.allclose(dense[0, :, 0], torch.tensor([0.0, expect1, 4.0, 8 - expect1, 8.0]), atol=1e-6)


def test_densify_uses_five_nearest_only():
    grid = (1, 10)
    pos = torch.arange(0, 10, 2).unsqueeze(0)  # cells 0,2,4,6,8 plus a far token at 9 (6 tokens)
    pos = torch.cat([pos, torch.tensor([[9]])], 1)
    vals = torch.tensor([[[1.0], [1.0], [1.0], [1.0], [1.0], [100.0]]])
    dense = densify(_out(vals, pos, grid), num_neighbors=5)
    # cell 1: five nearest are 0,2,4,6,8 (distances 1,1,3,5,7); 9 (distance 8) excluded -> exactly 1
    assert torch.allclose(dense[0, 1, 0], torch.tensor(1.0))


def test_densify_unmerges_through_assignment():
    patches = torch.tensor([[[1.0], [2.0]]])
    assignment = torch.tensor([[0, 0, 1, 1, 0, -1]])  # cell 5 dropped -> IDW
    out = _out(patches, torch.tensor([[0, 2]]), (2, 3), assignment=assignment)
    dense = densify(out)
    assert dense[0, :5, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 1.0]
    assert 1.0 < dense[0, 5, 0] < 2.0


def test_padding_and_unlocated_tokens_are_ignored():
    patches = torch.tensor([[[1.0], [5.0], [9.0]]])
    pos = torch.tensor([[0, -1, 3]])  # fused token without a location
    mask = torch.tensor([[True, True, False]])  # third is padding
    dense = densify(_out(patches, pos, (1, 4), mask=mask))
    assert torch.allclose(dense[0, :, 0], torch.ones(4))
