"""IPS: iterative top-M equals one-shot top-M, chunked memory, no-op budget, gradient pass, fit smoke test."""

from __future__ import annotations

import pytest
import torch
from _toy import BACKBONE_CASES, check_no_op_budget, make, toy_ctx

import lwbench.methods.ips as ips_mod
from lwbench.errors import BudgetError, ConfigError
from lwbench.heads import TaskModel
from lwbench.methods.ips import IPS, CrossAttentionScorer, softmax_head_mean
from lwbench.registry import get_method
from lwbench.tokens import densify
from lwbench.vit import assemble, embed_patches, to_output

torch.set_num_threads(1)


def one_shot_topm(enc, x, m):
    with torch.no_grad():
        scores = enc.selector.scorer.score(embed_patches(enc.vit, x))
    return scores.topk(m, dim=1).indices.sort(dim=1).values


def test_registered_and_budget_grid():
    cls = get_method("ips")
    assert cls is IPS and cls.budget_key == "k" and cls.training == "finetune" and cls.kind == "selection"
    _, spec = make()
    assert IPS.budget_grid(spec) == [2, 3, 6] and IPS(spec).budget == 3


@pytest.mark.parametrize("k", [0, 25])
def test_bad_budget_and_options(k):
    _, spec = make()
    with pytest.raises(BudgetError, match="valid: k=1..24"):
        IPS(spec, k)
    with pytest.raises(ConfigError, match="chunk"):
        IPS(spec, 4, chunk=0)


@pytest.mark.parametrize("m", [1, 5, 13])
def test_logit_ranking_iterative_selection_is_exact_top_m(m):
    """``ranking=logits`` (lwbench version 1) is buffer-independent: iterating equals the one-shot top-M."""
    vit, spec = make("lw_vit_test_p8", (64, 96))  # 8 x 12 = 96 patches
    x = torch.randn(3, 3, 64, 96)
    for chunk in (96, 32, 7, 1):  # one chunk (everything fits), several chunks, one patch at a time
        enc = IPS(spec, m, chunk=chunk, ranking="logits").build(vit).eval()
        with torch.no_grad():
            idx = enc.selector(enc.vit, x, m, chunk)
        assert torch.equal(idx, one_shot_topm(enc, x, m)), chunk


def test_single_head_ranking_is_ips_softmax_ranking():
    torch.manual_seed(0)
    scorer = CrossAttentionScorer(32, heads=1)
    emb = torch.randn(2, 40, 32)
    with torch.no_grad():
        ips_score = scorer.logits(emb).softmax(-1).mean(1)  # IPS's get_scores over one buffer
        ours = scorer.score(emb)
    assert torch.equal(ips_score.topk(7).indices.sort().values, ours.topk(7).indices.sort().values)


def test_softmax_head_mean_by_hand_differs_from_the_logit_mean():
    """Two heads, three patches: A (10, -10), B (1, 1), C (0, 0). Logit mean: B (1) > A = C (0). IPS's score, the
    head-mean softmax: head 1 puts ~1 on A, head 2 e/(e+1) = 0.731 on B and 0.269 on C, so A ~0.5 > B ~0.366."""
    logits = torch.tensor([[[10.0, 1.0, 0.0], [-10.0, 1.0, 0.0]]])  # (B=1, H=2, n=3)
    score = softmax_head_mean(logits)[0]
    e = torch.e
    expected = torch.tensor([(1 / (1 + e ** -9 + e ** -10) + e ** -10 / (e ** -10 + e + 1)) / 2,
                             (e ** -9 / (1 + e ** -9 + e ** -10) + e / (e ** -10 + e + 1)) / 2,
                             (e ** -10 / (1 + e ** -9 + e ** -10) + 1 / (e ** -10 + e + 1)) / 2])
    torch.testing.assert_close(score, expected)
    assert int(score.argmax()) == 0 and int(logits.mean(1)[0].argmax()) == 1


def _reference_ips(logits_of, n, m, chunk):
    """The official selection loop, written plainly: memory = first M; per chunk, score memory + chunk by the
    head-mean softmax of its logits over that buffer, keep the M best."""
    mem = list(range(m))
    for start in range(m, n, chunk):
        buf = mem + list(range(start, min(start + chunk, n)))
        score = logits_of(buf).softmax(-1).mean(0)  # (H, len) -> (len,)
        mem = [buf[i] for i in score.topk(m).indices.tolist()]
    return sorted(mem)


@pytest.mark.parametrize("m, chunk", [(5, 7), (13, 32), (3, 1)])
def test_default_ranking_is_the_official_softmax_loop_with_several_heads(m, chunk):
    vit, spec = make("lw_vit_test_p8", (64, 96))  # 96 patches
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    enc = IPS(spec, m, chunk=chunk, heads=4).build(vit).eval()
    with torch.no_grad():
        enc.selector.scorer.query.mul_(8.0)  # sharper attention: the two rules part more often
        got = enc.selector(enc.vit, x, m, chunk)
        logits = enc.selector.scorer.logits(embed_patches(enc.vit, x))  # (B, H, 96): a patch's logits are its own
    for b in range(2):
        ref = _reference_ips(lambda buf, b=b: logits[b][:, buf], 96, m, chunk)
        assert got[b].tolist() == ref
    one_shot = logits.mean(1).topk(m, dim=1).indices.sort(dim=1).values
    assert not torch.equal(got, one_shot)  # with several heads the official rule is not the logit top-M


def test_memory_embeds_at_most_one_chunk_at_a_time(monkeypatch):
    vit, spec = make("lw_vit_test_p8", (64, 96))
    sizes = []
    real = ips_mod.embed_patches

    def spy(v, x, idx=None):
        sizes.append(None if idx is None else idx.shape[1])
        return real(v, x, idx)

    monkeypatch.setattr(ips_mod, "embed_patches", spy)
    enc = IPS(spec, 10, chunk=16).build(vit).eval()
    with torch.no_grad():
        enc(torch.randn(2, 3, 64, 96))
    # first M, then ceil((96 - 10) / 16) = 6 chunks of <= 16, then the gradient pass on the M kept patches
    assert sizes == [10, 16, 16, 16, 16, 16, 6, 10]


@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_k_equal_to_grid_is_the_plain_backbone(name, size):
    check_no_op_budget(lambda spec: IPS(spec, spec.num_patches), name, size)


def test_untrained_model_runs_the_backbone_on_the_kept_patches():
    vit, spec = make()
    enc = IPS(spec, 5, chunk=4).build(vit).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = enc(x)
        idx = one_shot_topm(enc, x, 5)
        ref = to_output(enc.vit, enc.vit.blocks(assemble(enc.vit, embed_patches(enc.vit, x, idx))), idx, (4, 6))
    assert out.patches.shape == (2, 5, 32) and torch.equal(out.positions, idx)
    torch.testing.assert_close(out.prefix, ref.prefix)  # zero-initialised summary: exactly the plain backbone
    torch.testing.assert_close(out.patches, ref.patches)
    dense = densify(out)
    torch.testing.assert_close(dense.gather(1, idx.unsqueeze(-1).expand(-1, -1, 32)), out.patches)


def test_gradient_pass_trains_the_scorer():
    vit, spec = make()
    enc = IPS(spec, 5, chunk=4, dropout=0.0).build(vit).train()
    x = torch.randn(2, 3, 32, 48)
    enc(x).cls.pow(2).sum().backward()
    sel = enc.selector
    assert sel.to_cls.weight.grad.abs().sum() > 0  # the zero-initialised bridge learns first
    with torch.no_grad():
        sel.to_cls.weight.add_(0.1 * torch.randn_like(sel.to_cls.weight))
    enc.zero_grad()
    enc(x).cls.pow(2).sum().backward()
    for p in (sel.scorer.query, sel.scorer.q_w.weight, sel.scorer.k_w.weight, sel.scorer.v_w.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # ranking parameters get the task gradient


def test_fit_smoke_trains_and_checkpoints(tmp_path):
    vit, spec = make()
    ctx = toy_ctx(vit, tmp_path, steps=2)
    method = IPS(spec, 5, chunk=4)
    model = method.fit(ctx)
    assert isinstance(model, TaskModel) and not model.training
    assert (tmp_path / "ips-5" / "done.json").is_file()
    assert model.encoder.selector.to_cls.weight.abs().sum() > 0
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        logits = model(x)
        again = method.fit(ctx)(x)
    assert logits.shape == (2, 2)
    torch.testing.assert_close(again, logits)
