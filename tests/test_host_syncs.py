"""Host round trips in timed forwards and training steps (issue 32): what the CUDA path no longer does.

* ``random`` and ``grid`` build their cell indices once per shape and device: a second forward copies nothing from
  the host (counted on fake CUDA tensors, as tests/test_fake_cuda.py builds them), and the indices are those of the
  old per-forward computation.
* ATS and ALGM read back only what their padded representation needs (one width per stage, plus, for a batch,
  whether any image is padded); outputs are those of the full reads.
* The training loop reads the loss once a step (the NaN guard) and the loss parts only where a progress bar shows.
* Data loaders pin memory for CUDA only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_fake_cuda import _to_fake_cuda
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import lwbench
from lwbench.methods import algm as algm_mod
from lwbench.methods import ats as ats_mod
from lwbench.methods.grid import grid_indices
from lwbench.vit import run_selected

BACKBONE = "lw_vit_test_p8"
SIZE = (32, 48)  # 4 x 6 patches
GRID = (4, 6)


def _images(b: int, seed: int = 0, size=SIZE) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


class _HostCopies(TorchDispatchMode):
    """Counts copies from a CPU tensor to another device (``aten._to_copy`` / ``aten.copy_``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            dev = kwargs.get("device")
            if args[0].device.type == "cpu" and dev is not None and torch.device(dev).type != "cpu":
                self.count += 1
        elif func is torch.ops.aten.copy_.default:
            if args[1].device.type == "cpu" and args[0].device.type != "cpu":
                self.count += 1
        return func(*args, **kwargs)


class _ScalarReads(TorchDispatchMode):
    """Counts device-to-host scalar reads (``int(t)``, ``bool(t)``, ``t.item()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.off = False  # not counting (the optimizer's own reads of its CPU step counters)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default) and not self.off:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _copies_per_forward(method: str, budget: str, train: bool, forwards: int = 2) -> list[int]:
    """Host-to-device copies of each of ``forwards`` forwards of ``method``'s encoder on fake CUDA."""
    torch.manual_seed(0)
    model = lwbench.create_model(method, BACKBONE, SIZE, budget, num_classes=3)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    enc = _to_fake_cuda(copy.deepcopy(model.encoder), mode).train(train)
    counts = []
    with mode:
        x = mode.from_tensor(_images(2)).to("cuda")
        for _ in range(forwards):
            with torch.no_grad(), _HostCopies() as c:
                out = enc(x)
            assert out.patches.device.type == "cuda" and out.positions.device.type == "cuda"
            counts.append(c.count)
    return counts


# -- random and grid: indices built once ------------------------------------------------------------------------------
def _old_random_indices(b: int, n: int, k: int, seed: int) -> torch.Tensor:
    """The pre-cache evaluation draw: a CPU generator seeded every forward, top k, sorted."""
    scores = torch.rand(b, n, generator=torch.Generator(device="cpu").manual_seed(seed))
    return scores.topk(k, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("k", [1, 5, 24])
@pytest.mark.parametrize("seed", [0, 3])
def test_random_evaluation_draw_is_the_old_one_and_cached(k, seed):
    enc = lwbench.create_model("random", BACKBONE, SIZE, f"k={k}", num_classes=3, seed=seed).encoder.eval()
    n = GRID[0] * GRID[1]
    for b in (1, 3):
        x = _images(b)
        with torch.no_grad():
            out = enc(x)
            want = _old_random_indices(b, n, k, seed)
            assert torch.equal(out.positions, want)
            ref = run_selected(enc.vit, x, want)
            assert torch.equal(out.patches, ref.patches) and torch.equal(out.prefix, ref.prefix)
            cached = enc._eval_indices[(b, n, x.device)]
            assert enc(x).positions is cached  # the second forward draws nothing
    assert len(enc._eval_indices) == 2  # one per batch shape


def test_random_cache_is_no_state_and_survives_inference_mode_then_training():
    model = lwbench.create_model("random", BACKBONE, SIZE, "k=5", num_classes=3)
    keys = set(model.state_dict())
    enc = model.encoder.eval()
    with torch.inference_mode():
        enc(_images(2))
    assert set(model.state_dict()) == keys and enc._eval_indices
    cached = next(iter(enc._eval_indices.values()))
    assert not cached.is_inference()  # a later forward with autograd may save it for backward
    enc(_images(2)).patches.sum().backward()  # eval draw under autograd: no "inference tensor" error


def test_random_training_draw_on_the_cpu_is_the_global_stream():
    enc = lwbench.create_model("random", BACKBONE, SIZE, "k=5", num_classes=3).encoder.train()
    x = _images(2)
    torch.manual_seed(7)
    want = torch.rand(2, GRID[0] * GRID[1]).topk(5, dim=1).indices.sort(dim=1).values
    torch.manual_seed(7)
    assert torch.equal(enc(x).positions, want)
    assert not enc._eval_indices  # training draws are never cached


def test_oracle_ranks_every_forward():
    """oracle's cells depend on the images: it takes the per-forward path (and its cell_scores override)."""
    from lwbench.methods.oracle import OracleEncoder

    assert OracleEncoder.content_blind is False
    enc = lwbench.create_model("oracle", BACKBONE, SIZE, "k=5", num_classes=3).encoder.eval()
    calls = []
    enc.cell_scores = lambda x, n: calls.append(n) or torch.rand(x.shape[0], n)
    with torch.no_grad():
        enc(_images(2))
        enc(_images(2))
    assert calls == [24, 24] and not enc._eval_indices


@pytest.mark.parametrize("k", [1, 4, 7, 24])
def test_grid_indices_are_cached_and_the_old_ones(k):
    enc = lwbench.create_model("grid", BACKBONE, SIZE, f"k={k}", num_classes=3).encoder.eval()
    x = _images(3)
    with torch.no_grad():
        out = enc(x)
        assert torch.equal(out.positions, grid_indices(*GRID, k).expand(3, -1))
        cached = enc._indices[(*GRID, k, x.device)]
        assert enc(x).positions.data_ptr() == cached.data_ptr()  # a view of the cached tensor: nothing rebuilt
    with torch.inference_mode():
        enc(_images(2, size=(48, 48)))  # another grid: another entry, not an inference tensor
    assert len(enc._indices) == 2 and not any(t.is_inference() for t in enc._indices.values())
    enc.train()(x).patches.sum().backward()


@pytest.mark.parametrize("method,budget", [("random", "k=5"), ("grid", "k=5")])
def test_second_forward_copies_nothing_from_the_host(method, budget):
    first, second = _copies_per_forward(method, budget, train=False)
    assert first >= 1 and second == 0  # the indices went to the device once


def test_random_training_on_cuda_draws_on_the_device():
    assert _copies_per_forward("random", "k=5", train=True) == [0, 0]


# -- ATS and ALGM: only the reads the padded representation needs -----------------------------------------------------
def _reads(enc: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), _ScalarReads() as r:
        enc(x)
    return r.count


def test_ats_reads_one_width_per_stage_and_at_batch_1_nothing_else():
    enc = lwbench.create_model("ats", BACKBONE, SIZE, "keep_rate=0.5", num_classes=3).encoder.eval()
    stages = len(enc.samplers)
    assert stages >= 1
    assert _reads(enc, _images(1)) == stages  # int(count.max()) only (was 3 a stage: + max k, + valid.all)
    assert _reads(enc, _images(4)) == 2 * stages  # + whether any image is padded


def test_ats_host_bound_on_the_samples_is_their_max(monkeypatch):
    """The bound computed on the host is max(k) itself, so the tensors keep their shapes."""
    seen = []
    real = ats_mod.inverse_transform_sample

    def check(scores, valid, k, kmax=None):
        seen.append((kmax, int(k.max())))
        return real(scores, valid, k, kmax)

    monkeypatch.setattr(ats_mod, "inverse_transform_sample", check)
    for opts in ({}, {"samples": "initial", "stages": "published"}):
        for rate in (0.3, 0.5, 0.9):
            enc = lwbench.create_model("ats", BACKBONE, SIZE, f"keep_rate={rate}", num_classes=3, **opts).encoder
            with torch.no_grad():
                enc.eval()(_images(4, seed=int(rate * 10)))
    assert seen and all(bound == real_max for bound, real_max in seen), seen


def test_ats_sampling_with_a_larger_bound_picks_the_same_tokens():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 10, generator=g)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 7:] = False
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    scores = scores / scores.sum(1, keepdim=True)
    k = torch.tensor([4, 2, 6])
    want = ats_mod.inverse_transform_sample(scores, valid, k)
    for kmax in (6, 7, 10, 25):
        assert torch.equal(ats_mod.inverse_transform_sample(scores, valid, k, kmax), want)


def test_ats_batch_output_is_padded_and_equal_to_each_image_alone():
    """The batch path (masked attention where an image is padded) against one image at a time (no read)."""
    enc = lwbench.create_model("ats", BACKBONE, SIZE, "keep_rate=1.0", num_classes=3, samples="initial",
                               stages="published").encoder.eval()  # duplicates dropped: counts differ
    x = _images(4, seed=1) * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)
    with torch.no_grad():
        out = enc(x)
        assert out.mask is not None and not bool(out.mask.all())  # padded: the masked attention ran
        for i in range(4):
            one = enc(x[i: i + 1])
            n = one.patches.shape[1]
            torch.testing.assert_close(out.patches[i, :n], one.patches[0], rtol=1e-4, atol=1e-5)
            assert torch.equal(out.positions[i, :n], one.positions[0])


def test_algm_reads_one_width_per_stage_and_at_batch_1_nothing_else():
    enc = lwbench.create_model("algm", BACKBONE, SIZE, "threshold=0.3", num_classes=3).encoder.eval()
    stages = 1 + (enc.glob is not None)
    assert _reads(enc, _images(1)) == stages  # int(n_out.max()) only (was one more for every block after a merge)
    assert _reads(enc, _images(4)) == 2 * stages  # + whether any image is padded, once a stage


def test_algm_known_fullness_is_the_masks(monkeypatch):
    """Where the encoder passes ``full``, it is ``valid.all()``; the bias is made once a merge stage."""
    seen = []
    real = algm_mod.key_bias

    def check(size, valid, p, prop_attn, full=None):
        seen.append((full, bool(valid.all())))
        return real(size, valid, p, prop_attn, full)

    monkeypatch.setattr(algm_mod, "key_bias", check)
    for prop in (False, True):
        enc = lwbench.create_model("algm", BACKBONE, SIZE, "threshold=0.3", num_classes=3, prop_attn=prop).encoder
        with torch.no_grad():
            for b in (1, 4):
                enc.eval()(_images(b, seed=2))
    assert seen and all(full == real_full for full, real_full in seen)
    assert len(seen) == 2 * 2 * (1 + (enc.glob is not None))  # once a stage, not once a block


# -- training: one read a step, loss parts only for a bar -------------------------------------------------------------
def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g)


def _loss(m, x, y):
    out = m(x)
    ce = nn.functional.cross_entropy(out, y)
    return ce, {"ce": ce.detach(), "mean": out.mean().detach(), "k": 3}


def test_training_reads_the_loss_once_a_step_and_trains_the_same_weights(monkeypatch):
    from lwbench.config import TrainConfig
    from lwbench.training.loop import train_loop

    stage = TrainConfig(steps=4, batch_size=4, lr=1e-2, weight_decay=0.05, warmup_steps=1, grad_clip=1.0)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ref = copy.deepcopy(model)
    reads = _ScalarReads()
    step = torch.optim.AdamW.step

    def uncounted_step(self, *a, **k):  # AdamW reads its step counters, CPU tensors on every device: no sync
        reads.off = True
        try:
            return step(self, *a, **k)
        finally:
            reads.off = False

    monkeypatch.setattr(torch.optim.AdamW, "step", uncounted_step)
    with reads:
        train_loop(model, _loss, _batches(), stage, quiet=True)
    assert reads.count == 4  # the NaN guard's loss.item(); no loss part is read without a bar
    monkeypatch.undo()

    # The same updates by hand (AdamW, warm-up, clipping): the loop's weights, bit for bit.
    from lwbench.training.loop import lr_at, param_groups

    groups = param_groups(list(ref.parameters()), 0.05)
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999))
    data = _batches()
    ref.train()
    for step in range(4):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, 4, 1e-2, 1) * grp.get("lr_mult", 1.0)
        x, y = next(data)
        loss = _loss(ref, x, y)[0].float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_postfix_reads_tensor_parts_in_one_transfer():
    from lwbench.training.loop import _postfix

    with _ScalarReads() as r:
        shown = _postfix({"ce": torch.tensor(0.51234), "kl": torch.tensor(2.0), "k": 3, "sigma": 0.05})
    assert shown == {"ce": "0.512", "kl": "2", "k": "3", "sigma": "0.05"} and r.count == 0  # one .tolist()
    assert _postfix({}) == {}


# -- pinned memory for CUDA only --------------------------------------------------------------------------------------
def test_pin_memory_only_for_cuda(monkeypatch):
    from torch.utils.data import TensorDataset

    from lwbench.training.loop import EpochStream, pin_memory_for

    assert pin_memory_for("cuda") and pin_memory_for("cuda:1") and pin_memory_for(torch.device("cuda", 0))
    assert not pin_memory_for("cpu") and not pin_memory_for("mps") and not pin_memory_for("meta")
    ds = TensorDataset(torch.randn(8, 2), torch.zeros(8))
    assert EpochStream(ds, 4, pin_memory=True)._loader.pin_memory is True
    assert EpochStream(ds, 4)._loader.pin_memory is False

    task = lwbench.TASKS.get("traffic_signs")(source="synthetic")
    assert task.loader("test", 4, limit=8).pin_memory is False
    assert task.loader("test", 4, limit=8, pin_memory=True).pin_memory is True


def test_training_context_pins_for_cuda_only():
    from lwbench.training.context import FitContext

    task = lwbench.TASKS.get("traffic_signs")(source="synthetic")
    for device, pinned in (("cpu", False), ("cuda", True)):
        ctx = FitContext.__new__(FitContext)
        ctx.task, ctx.device = task, device
        assert ctx.train_batches(4)._loader.pin_memory is pinned

