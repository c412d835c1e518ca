from __future__ import annotations

import pytest
import torch

from lwbench.errors import ConfigError
from lwbench.heads import ClassifierHead, pool_patches
from lwbench.tokens import TokenOutput


def _out(patches, mask=None, sizes=None, keep=None):
    b = patches.shape[0]
    return TokenOutput(prefix=torch.full((b, 2, patches.shape[-1]), 7.0), patches=patches,
                       positions=torch.zeros(patches.shape[:2], dtype=torch.long), grid=(1, patches.shape[1]),
                       mask=mask, sizes=sizes, keep=keep)


def _identity_head(pool, dim=2):
    head = ClassifierHead(dim, dim, pool)
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(dim))
        head.fc.bias.zero_()
    return head


def test_token_pool_reads_cls():
    assert torch.equal(_identity_head("token")(_out(torch.zeros(1, 3, 2))), torch.full((1, 2), 7.0))


def test_max_pool_ignores_padding():
    patches = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(_identity_head("max")(_out(patches, mask)), torch.tensor([[3.0, 5.0]]))


def test_avg_pool_weights_merge_sizes():
    patches = torch.tensor([[[1.0, 0.0], [4.0, 0.0]]])
    sizes = torch.tensor([[3, 1]])
    assert torch.allclose(_identity_head("avg")(_out(patches, sizes=sizes)), torch.tensor([[7 / 4, 0.0]]))


def test_token_plus_max_reads_cls_then_max_pooled_patches():
    patches = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    head = ClassifierHead(2, 4, "token+max")
    assert head.fc.in_features == 4
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(4))
        head.fc.bias.zero_()
    assert torch.equal(head(_out(patches, mask)), torch.tensor([[7.0, 7.0, 3.0, 5.0]]))


def test_bad_pool():
    with pytest.raises(ConfigError, match="token, max, avg, token\\+max"):
        ClassifierHead(4, 2, "sum")


# Straight-through keep decisions (DynamicViT's training output): the value is the hard-masked pool, the gradient of a
# decision is the change of the pool when that token alone enters (dropped) or leaves (kept).
_X = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [4.0, 9.0], [0.0, 1.0], [8.0, 8.0]]])
_KEEP = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])  # tokens 2 and 4 dropped (still present), 4 is padding below
_PAD = torch.tensor([[True, True, True, True, False]])


def _toggled(j):
    keep = _KEEP.clone()
    keep[0, j] = 1.0 - keep[0, j]
    return keep


@pytest.mark.parametrize("how", ["max", "avg"])
def test_straight_through_pool_value_is_the_hard_masked_pool(how):
    keep = _KEEP.clone().requires_grad_(True)
    pooled = pool_patches(_out(_X, _PAD, keep=keep), how)
    counted = _PAD & (_KEEP > 0.5)
    assert torch.equal(pooled.detach(), pool_patches(_out(_X, counted), how))
    assert torch.equal(pooled.detach(), torch.tensor([[3.0, 5.0]]) if how == "max" else torch.tensor([[4 / 3, 8 / 3]]))


def test_straight_through_max_gradient_is_the_effect_of_toggling_one_token():
    """Known answer: d pool_c / d keep_j equals pool(keep with j toggled) - pool(keep), signed by the toggle."""
    keep = _KEEP.clone().requires_grad_(True)
    pooled = pool_patches(_out(_X, _PAD, keep=keep), "max")
    for c in range(2):
        (g,) = torch.autograd.grad(pooled[0, c], keep, retain_graph=True)
        for j in range(5):
            if not _PAD[0, j]:
                assert g[0, j] == 0  # padding never joins
                continue
            after = pool_patches(_out(_X, _PAD & (_toggled(j) > 0.5)), "max")[0, c]
            sign = 1.0 if _KEEP[0, j] == 0 else -1.0
            assert g[0, j] == pytest.approx(sign * float(after - pooled[0, c].detach())), (c, j)
    # token 2 (dropped) would raise channel 1 from 5 to 9; kept token 1 is channel 0's arg-max (3, next 1)
    (g,) = torch.autograd.grad(pooled[0, 1], keep, retain_graph=True)
    assert g[0, 2] == 4.0
    (g,) = torch.autograd.grad(pooled[0, 0], keep)
    assert g[0, 1] == 2.0


def test_straight_through_avg_gradient_is_the_weighted_mean_derivative():
    keep = _KEEP.clone().requires_grad_(True)
    pooled = pool_patches(_out(_X, _PAD, keep=keep), "avg")
    (g,) = torch.autograd.grad(pooled[0, 0], keep)
    mean = 4 / 3  # of tokens 0, 1, 3
    assert torch.allclose(g, torch.tensor([[1 - mean, 3 - mean, 4 - mean, 0 - mean, 0.0]]) / 3)
