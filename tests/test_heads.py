from __future__ import annotations

import pytest
import torch

from lwbench.errors import ConfigError
from lwbench.heads import ClassifierHead
from lwbench.tokens import TokenOutput


def _out(patches, mask=None, sizes=None):
    b = patches.shape[0]
    return TokenOutput(prefix=torch.full((b, 2, patches.shape[-1]), 7.0), patches=patches,
                       positions=torch.zeros(patches.shape[:2], dtype=torch.long), grid=(1, patches.shape[1]),
                       mask=mask, sizes=sizes)


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
