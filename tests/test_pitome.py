"""PiToMe: the energy of a token by hand, low-energy (isolated) tokens protected, every A token merged into its
most similar B token, the BSM step against a plain reference, the official per-block margins and BSM blocks,
size-weighted merging, r=0 is the plain backbone."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import BACKBONE_CASES, check_no_op_budget, make

from lwbench.methods.pitome import EnergyMerger, PiToMe, block_margins, bsm_flags, energy_scores
from lwbench.registry import get_method


def _cluster_tokens():
    """Three identical tokens (a cluster) and one orthogonal (isolated) token, T = 4."""
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    return torch.stack([e0, e0, e0, e1]).unsqueeze(0)  # (1, 4, 4)


def test_energy_of_a_cluster_and_an_isolated_token_by_hand():
    """margin 0.5, alpha 1: a cluster member sees 3 tokens at cos 1 (ELU(0.5) = 0.5) and one at cos 0
    (ELU(-0.5) = e^-0.5 - 1): (3 * 0.5 + e^-0.5 - 1) / 4 = 0.2766; the isolated token sees itself at cos 1 and
    three at 0: (0.5 + 3 (e^-0.5 - 1)) / 4 = -0.1701."""
    energy = energy_scores(_cluster_tokens(), margin=0.5, alpha=1.0)[0]
    member = (3 * 0.5 + math.exp(-0.5) - 1) / 4
    isolated = (0.5 + 3 * (math.exp(-0.5) - 1)) / 4
    torch.testing.assert_close(energy, torch.tensor([member, member, member, isolated]))
    assert member == pytest.approx(0.2766, abs=1e-4) and isolated == pytest.approx(-0.1701, abs=1e-4)


def test_the_isolated_token_is_protected_and_the_cluster_merges():
    """r = 1: the two highest-energy tokens (cluster members) are mergeable, A = the first, B = the second; the
    isolated token and the third member are protected. The merged token is the size-weighted mean."""
    metric = _cluster_tokens()
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    size = torch.ones(1, 4, 1)
    positions = torch.tensor([[10, 11, 12, 13]])
    assignment = torch.tensor([[0, 1, 2, 3]])
    protected, a, b, dst = EnergyMerger(0.5, 1.0).plan(metric, 1)
    assert a.tolist() == [[0]] and b.tolist() == [[1]] and protected.tolist() == [[2, 3]]  # 3 = isolated: kept
    new_x, new_size, new_pos, new_assign = EnergyMerger(0.5, 1.0)(x, metric, size, positions, assignment, 1)
    assert new_x.flatten().tolist() == [5.0, 7.0, 2.0] and new_size.flatten().tolist() == [1.0, 1.0, 2.0]
    assert new_pos.tolist() == [[12, 13, 11]] and new_assign.tolist() == [[2, 2, 0, 1]]


def test_every_a_token_merges_into_its_most_similar_b_token():
    torch.manual_seed(0)
    metric = torch.randn(2, 12, 8)
    protected, a, b, dst = EnergyMerger(0.5, 1.0).plan(metric, 3)
    m = torch.nn.functional.normalize(metric, dim=-1)
    for i in range(2):
        for j in range(3):
            cos = (m[i, a[i, j]] * m[i, b[i]]).sum(-1)
            assert int(dst[i, j]) == int(cos.argmax())
        order = energy_scores(metric)[i].argsort(descending=True)
        assert sorted(a[i].tolist() + b[i].tolist()) == sorted(order[:6].tolist())  # the 2r most energetic
        assert protected[i].tolist() == sorted(order[6:].tolist())


def test_registered_with_tomes_budget():
    cls = get_method("pitome")
    _, spec = make()
    assert cls is PiToMe and cls.budget_key == "r" and cls.training == "none"
    assert PiToMe.budget_grid(spec) == get_method("tome").budget_grid(spec)


@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_r0_is_the_plain_backbone(name, size):
    check_no_op_budget(lambda spec: PiToMe(spec, 0), name, size)


def test_merges_r_per_block_and_sizes_add_up():
    vit, spec = make("lw_vit_test_p8", (64, 96))  # 96 patches
    with torch.no_grad():
        out = PiToMe(spec, 4).build(vit).eval()(torch.randn(2, 3, 64, 96))
    assert out.patches.shape[1] == 96 - 4 * spec.depth
    assert out.sizes.sum(1).tolist() == [96, 96]
    assert out.aux["tokens_per_layer"][0].tolist() == [96 - 4 * (i + 1) for i in range(spec.depth)]


def test_official_margin_schedule_and_bsm_blocks():
    """deit.py: ``margins = [.75 - .75*(i/num_layers) ...]``; BSM in the first ceil(L/2) blocks."""
    assert block_margins(0.75, 12, "linear") == pytest.approx([0.75 - 0.0625 * i for i in range(12)])
    assert block_margins(0.5, 3, "constant") == [0.5, 0.5, 0.5]
    assert bsm_flags(12, "first_half") == [True] * 6 + [False] * 6
    assert bsm_flags(5, "first_half") == [True, True, True, False, False]  # ceil(2.5) = 3
    assert bsm_flags(5, "second_half") == [False, False, False, True, True] and not any(bsm_flags(5, "none"))
    vit, spec = make()
    enc = PiToMe(spec, 2).build(vit)
    depth = len(vit.blocks)
    assert [m.margin for m in enc.matchers] == pytest.approx([0.75 - 0.75 * i / depth for i in range(depth)])
    assert [m.bsm for m in enc.matchers] == bsm_flags(depth, "first_half") and not enc.prop_attn


def _bsm_reference(metric: torch.Tensor, r: int, margin: float):
    """The official pitome_bsm step written plainly for one image: alternate tokens by energy rank into A and B,
    each A's most similar B, the r A tokens with the most similar partners merge. Returns {a: b} and the rest."""
    m = torch.nn.functional.normalize(metric[0], dim=-1)
    sim = m @ m.T
    energy = torch.nn.functional.elu(sim - margin).mean(-1)
    order = sorted(range(len(energy)), key=lambda i: -float(energy[i]))
    a, b = order[0::2], order[1::2]
    best = {i: max(b, key=lambda j: float(sim[i, j])) for i in a}
    ranked = sorted(a, key=lambda i: -float(sim[i, best[i]]))
    return {i: best[i] for i in ranked[:r]}, sorted(ranked[r:])


def test_bsm_step_matches_a_plain_reference_and_protects_nothing():
    torch.manual_seed(3)
    metric = torch.randn(1, 11, 6)
    merges, kept = _bsm_reference(metric, 3, 0.4)
    protected, a, b, dst = EnergyMerger(0.4, 1.0, bsm=True).plan(metric, 3)
    got = {int(i): int(b[0, j]) for i, j in zip(a[0], dst[0], strict=True)}
    assert got == merges
    assert protected[0].tolist() == kept  # the unmerged A tokens, in sequence order
    assert protected.shape[1] + a.shape[1] + b.shape[1] == 11 and b.shape[1] == 5  # every token is in A or B
    x, size = torch.randn(1, 11, 4), torch.ones(1, 11, 1)
    new_x, new_size, _, assign = EnergyMerger(0.4, 1.0, bsm=True)(x, metric, size, torch.arange(11)[None],
                                                                   torch.arange(11)[None], 3)
    assert new_x.shape[1] == 8 and new_size.sum() == 11
    for src, dst_tok in merges.items():  # a merged A token lands where its B partner went, as their size-mean
        assert assign[0, src] == assign[0, dst_tok]
        torch.testing.assert_close(new_x[0, assign[0, src]], (x[0, src] + x[0, dst_tok]) / 2)
