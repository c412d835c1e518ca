"""DynamicViT: budgets, stage token counts, the no-op budget, masked-attention training, loss, fit smoke test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _toy import BACKBONE_CASES, check_no_op_budget, make, toy_ctx

from lwbench.errors import BudgetError, ConfigError
from lwbench.heads import ClassifierHead, TaskModel
from lwbench.method import freeze
from lwbench.methods.dynamicvit import (
    MASK_EPS,
    DynamicViT,
    attention_bias,
    default_prune_locs,
    dynamicvit_loss,
    keep_counts,
)
from lwbench.methods.full import FullEncoder
from lwbench.registry import get_method
from lwbench.tokens import densify

torch.set_num_threads(1)


def test_registered_and_metadata():
    cls = get_method("dynamicvit")
    assert cls is DynamicViT
    assert cls.budget_key == "keep_rate" and cls.training == "finetune" and cls.kind == "reduction"
    assert len(cls.default_budgets) >= 3 and all(0 < b <= 1 for b in cls.default_budgets)
    _, spec = make()
    assert DynamicViT(spec).budget == 0.7  # the paper's main setting is the default


def test_prune_locations_and_keep_counts():
    assert default_prune_locs(12) == [3, 6, 9]  # the official pruning_loc for DeiT-S / ViT-B
    assert default_prune_locs(24) == [6, 12, 18]
    assert default_prune_locs(2) == [1]
    assert keep_counts(196, 0.7, 3) == [137, 96, 67]  # floor(196 * 0.7^s), the official int(N * rho^s)
    assert keep_counts(196, 0.5, 2) == [98, 49]  # exact products do not floor below themselves
    assert keep_counts(24, 1.0, 3) == [24, 24, 24]
    assert keep_counts(10, 0.01, 2) == [1, 1]


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_bad_budget_fails_before_work(budget):
    _, spec = make()
    with pytest.raises(BudgetError, match="valid: keep_rate in"):
        DynamicViT(spec, budget)


@pytest.mark.parametrize("locs", ["0", "2", "1,1", "x"])
def test_bad_prune_locs(locs):
    _, spec = make()  # 2 blocks: only location 1 exists
    with pytest.raises(ConfigError, match="prune_locs"):
        DynamicViT(spec, 0.7, prune_locs=locs)


@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_keep_rate_one_is_the_plain_backbone(name, size):
    check_no_op_budget(lambda spec: DynamicViT(spec, 1.0), name, size)


def test_dinov2_twelve_blocks_prunes_before_blocks_3_6_9():
    vit, spec = make("vit_small_patch14_reg4_dinov2", (70, 98))  # 5 x 7 = 35 patches
    enc = DynamicViT(spec, 0.7).build(vit).eval()
    seen = []
    for blk in enc.vit.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1] - 5))
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 70, 98))
    assert seen == [35] * 3 + [24] * 3 + [17] * 3 + [12] * 3  # floor(35 * 0.7^s)
    assert out.patches.shape == (1, 12, 384) and out.prefix.shape == (1, 5, 384)


def test_build_does_not_touch_the_backbone():
    vit, spec = make()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    enc = DynamicViT(spec, 0.5).build(vit)
    for p in enc.parameters():
        p.data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_inference_gathers_tokens_stage_by_stage():
    vit, spec = make("lw_vit_test_p14", (56, 84))  # 3 blocks, 4x6 = 24 patches; stages before blocks 1 and 2
    m = DynamicViT(spec, 0.7)
    assert m.prune_locs() == [1, 2] and m.keep_counts() == [16, 11]
    enc = m.build(vit).eval()
    seen = []
    for blk in enc.vit.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    x = torch.randn(3, 3, 56, 84)
    with torch.no_grad():
        out = enc(x)
    assert seen == [5 + 24, 5 + 16, 5 + 11]  # CLS + 4 registers are never pruned
    assert out.prefix.shape == (3, 5, 48) and out.patches.shape == (3, 11, 48)
    pos = out.positions
    assert pos.shape == (3, 11) and bool((pos[:, 1:] > pos[:, :-1]).all()) and int(pos.max()) < 24
    dense = densify(out)
    assert dense.shape == (3, 24, 48)
    torch.testing.assert_close(dense.gather(1, pos.unsqueeze(-1).expand(-1, -1, 48)), out.patches)


def test_masked_attention_equals_official_softmax_with_policy():
    """The float mask reproduces the official multiplicative policy, values and gradients."""
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 9, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    policy = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0, 0, 1, 1]], dtype=torch.float64)
    w = torch.randn(b, h, n, d, dtype=torch.float64)

    def official(pol):  # DynamicViT's Attention.softmax_with_policy
        attn = (q @ k.transpose(-2, -1)) * d**-0.5
        ap = pol.reshape(b, 1, 1, n)
        ap = ap + (1.0 - ap) * torch.eye(n, dtype=ap.dtype).view(1, 1, n, n)
        attn = (attn - attn.max(-1, keepdim=True)[0]).exp() * ap
        attn = (attn + 1e-6 / n) / (attn.sum(-1, keepdim=True) + 1e-6)
        return attn @ v

    p1 = policy.clone().requires_grad_()
    (official(p1) * w).sum().backward()
    p2 = policy.clone().requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(p2))
    (out * w).sum().backward()
    torch.testing.assert_close(out, official(policy), atol=1e-5, rtol=0)
    torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-4)
    assert p1.grad.abs().max() > 0.1  # dropped tokens get a real gradient too
    assert float(attention_bias(policy)[0, 0, 0, 2]) == pytest.approx(math.log(MASK_EPS))


def test_masked_block_matches_pruned_block_on_kept_tokens():
    vit, _ = make()
    blk = vit.blocks[0]
    x = torch.randn(2, 5 + 24, 32)
    keep = torch.ones(2, 29)
    keep[0, [6, 9, 20]] = 0
    keep[1, [5, 7, 8, 28]] = 0
    with torch.no_grad():
        masked = blk(x, attn_mask=attention_bias(keep))
        for i in range(2):
            kept = keep[i].bool()
            pruned = blk(x[i: i + 1, kept])
            torch.testing.assert_close(masked[i: i + 1, kept], pruned, atol=1e-5, rtol=0)


def test_training_forward_and_loss():
    vit, spec = make("lw_vit_test_p14", (56, 84))
    teacher = freeze(TaskModel(FullEncoder(vit), ClassifierHead(48, 2))).eval()
    model = TaskModel(DynamicViT(spec, 0.5).build(vit), ClassifierHead(48, 2)).train()
    x, y = torch.randn(4, 3, 56, 84), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(1)
    out = model.encoder(x)
    d1, d2 = out.aux["decisions"]
    assert out.patches.shape == (4, 24, 48)  # nothing is removed while training, only hidden
    assert set(d1.unique().tolist()) <= {0.0, 1.0} and bool((d2 <= d1).all())  # decisions are cumulative
    assert torch.equal(out.aux["keep"], d2) and torch.equal(out.keep.detach(), d2) and out.mask is None
    assert out.keep.requires_grad  # the straight-through decisions reach the head (lwbench.heads.pool_patches)
    assert out.aux["ratios"] == [0.5, 0.25]
    loss, logs = dynamicvit_loss(teacher)(model, x, y)
    assert torch.isfinite(loss) and set(logs) == {"ce", "ratio", "kl", "tok", "keep"}
    loss.backward()
    for pred in model.encoder.predictors:
        assert pred.out_conv[-2].weight.grad is not None and pred.out_conv[-2].weight.grad.abs().sum() > 0


def test_loss_is_zero_distillation_when_student_is_teacher():
    """Nothing dropped (forced keep) and student == teacher: only CE and the ratio term remain."""
    vit, spec = make()
    head = ClassifierHead(32, 2)
    teacher = freeze(TaskModel(FullEncoder(vit), head)).eval()
    model = TaskModel(DynamicViT(spec, 0.5).build(vit), head).train()
    last = model.encoder.predictors[0].out_conv[-2]
    with torch.no_grad():  # log p(keep) >> log p(drop): Gumbel noise cannot flip it
        last.weight.zero_()
        last.bias.copy_(torch.tensor([50.0, -50.0]))
    x, y = torch.randn(2, 3, 32, 48), torch.tensor([0, 1])
    loss, logs = dynamicvit_loss(teacher)(model, x, y)
    assert logs["keep"] == 1.0 and logs["kl"] == pytest.approx(0.0, abs=1e-6) and logs["tok"] < 1e-10
    ce = F.cross_entropy(teacher(x), y)
    assert float(loss.detach()) == pytest.approx(float(ce) + 2.0 * (1.0 - 0.5) ** 2, rel=1e-5)


def test_fit_smoke_trains_and_checkpoints(tmp_path):
    vit, spec = make()
    ctx = toy_ctx(vit, tmp_path, steps=6)
    method = DynamicViT(spec, 0.5)
    model = method.fit(ctx)
    assert isinstance(model, TaskModel) and not model.training
    assert (tmp_path / "dynamicvit-0.5-predictors" / "done.json").is_file()  # round(6 * 5/30) = 1 step
    assert (tmp_path / "dynamicvit-0.5" / "done.json").is_file()
    # the backbone moved (at 0.01x), the frozen position embedding did not
    assert not torch.equal(model.encoder.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert torch.equal(model.encoder.vit.pos_embed, vit.pos_embed)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        logits = model(x)
        again = method.fit(ctx)(x)  # a rerun resumes from the finished checkpoints instead of training
    assert logits.shape == (2, 2)
    torch.testing.assert_close(again, logits)


def test_task_loss_reaches_the_decisions_through_a_max_pooled_head():
    """The quick profile's head max-pools the patches. Version 2 hid the kept set behind a detached mask, so the
    task loss reached the keep decisions only through attention and the billiards predictors learned to drop every
    ball; now the pooled value is unchanged and the decisions get the loss through the pool as well."""
    vit, spec = make("lw_vit_test_p14", (56, 84))
    model = TaskModel(DynamicViT(spec, 0.5).build(vit), ClassifierHead(48, 2, "max")).train()
    x, y = torch.randn(4, 3, 56, 84), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(1)
    out = model.encoder(x)
    hard = out.patches.masked_fill(~(out.aux["keep"] > 0.5).unsqueeze(-1), float("-inf")).amax(1)
    logits = model.head(out)
    assert torch.allclose(logits, model.head.fc(hard))  # the forward pools exactly the kept tokens
    keep = out.keep
    keep.retain_grad()
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0
