"""Every registered method's forward (eval and train, with backward; float32 and bfloat16 autocast) traced on
fake CUDA tensors, on a machine without a GPU: a tensor made on the CPU inside a forward that runs on CUDA
(``torch.arange(n)`` without ``device=``, a mask built with ``torch.ones(...)``) fails here, in the default
suite, instead of on the first GPU run.

How: the model is built as usual, then its parameters and buffers are replaced by ``FakeTensorMode`` tensors on
``cuda:0`` (no memory, no kernels, no GPU needed; shapes, dtypes and devices are propagated by the meta kernels,
and an op mixing ``cuda:0`` with a CPU tensor raises ``FakeTensorDeviceMismatchError`` as it would on a GPU).
Two things a fake tensor cannot do are supplied from a real CPU run of the same model on the same images:

* **Data-dependent values** (``int(n_out.max())`` in ALGM, ``int(k.max())`` in ATS, ``.item()``, ``.tolist()``,
  boolean-mask indexing): the CPU run records every scalar read and every data-dependent output shape, in order
  (:class:`_Record`), and the fake run replays them (:class:`_Replay`), so it takes the CPU run's path through the
  code. A fake run that reads a different sequence fails (the paths diverged). An op whose output shape depends on
  the data gets the CPU run's shape only where the fake kernel cannot compute it, after its inputs' devices are
  checked.
* **Backward**: torch's autograd engine asks the CUDA driver for its streams as soon as a graph holds a CUDA
  tensor, which fails without a GPU. :func:`_backward` walks the graph in Python instead (each node called once all
  its gradients are in, as the engine does) and checks, as the engine's ``validate_outputs`` does, that every
  gradient is on its input's device.

Autocast: ``torch.autocast("cuda")`` disables itself where CUDA is unavailable, so the test tells it that CUDA and
bfloat16 are there. Both runs use ``torch.no_grad`` rather than ``inference_mode``: under ``inference_mode`` a
Python dispatch mode receives ``aten.einsum`` before autocast has cast its operands (a torch quirk that a real run
without modes does not have).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lwbench
from lwbench.precision import wrap

BACKBONE = "lw_vit_test_p8"
SIZE = (32, 48)  # 4 x 6 patches, CLS + 4 registers, 2 blocks
BATCH = 2
_SCALAR_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
_INDEX = torch.ops.aten.index.Tensor


def _data_dependent(func) -> bool:
    return torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags


class _Record(TorchDispatchMode):
    """Logs, in order, what every data-dependent op returned in a real run: a scalar read's value, or the shapes
    and dtypes of an op whose output shape depends on the data (``nonzero``, ``masked_select``, ...)."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.dynamic_output_shape in func.tags:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.log.append((str(func), (isinstance(out, (tuple, list)), [(o.shape, o.dtype) for o in outs])))
        elif torch.Tag.data_dependent_output in func.tags:
            self.log.append(("scalar" if func in _SCALAR_OPS else str(func), out))
        return out


class _Replay(TorchDispatchMode):
    """Answers the fake run's data-dependent ops with what :class:`_Record` logged (above ``FakeTensorMode``, so
    the tensors it makes are fake, on the op's device)."""

    def __init__(self, log: list[tuple[str, object]]):
        super().__init__()
        self.log = list(log)
        self.i = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _data_dependent(func):
            return func(*args, **(kwargs or {}))
        key = "scalar" if func in _SCALAR_OPS else str(func)
        if self.i >= len(self.log) or self.log[self.i][0] != key:
            seen = self.log[self.i][0] if self.i < len(self.log) else "the end of the CPU run's log"
            raise AssertionError(f"data-dependent op #{self.i} is {key} on fake CUDA but {seen} on the CPU: the two "
                                 f"runs took different paths")
        value = self.log[self.i][1]
        self.i += 1
        if torch.Tag.dynamic_output_shape not in func.tags:
            return value
        try:  # most calls have a static shape after all (``aten.index`` with integer indices): devices are checked
            return func(*args, **(kwargs or {}))
        except DynamicOutputShapeException:
            pass
        many, specs = value
        device = _one_device(func, args, kwargs)
        outs = tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs)
        return outs if many else outs[0]


def _one_device(func, args, kwargs) -> torch.device:
    """The device of a data-dependent op's output, which the fake kernel could not compute: its first tensor's, with
    every other tensor on it too (a 0-dim CPU tensor, or a CPU index into a CUDA tensor, being allowed, as on a GPU).
    """
    tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device and not (t.device.type == "cpu" and (t.dim() == 0 or func is _INDEX)):
            raise RuntimeError(f"{func}: expected all tensors to be on the same device, but found {device} and "
                               f"{t.device}")
    return device


def _to_fake_cuda(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``model`` with every parameter and buffer replaced, in place, by a fake tensor on ``cuda:0`` (what
    ``model.to("cuda")`` moves; a tensor kept in a plain attribute stays a CPU tensor, as it would on a GPU)."""
    memo: dict[int, torch.Tensor] = {}
    with mode:
        for module in model.modules():
            for table, param in ((module._parameters, True), (module._buffers, False)):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    if id(t) not in memo:  # tied weights stay tied
                        fake = mode.from_tensor(t.detach()).to("cuda")
                        memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if param else fake
                    table[name] = memo[id(t)]
    return model


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without torch's engine (which needs a real GPU for CUDA tensors): every node of the
    graph is called once all its output gradients are in, in dependency order, and every gradient is checked
    against the device its input had in the forward and summed down to its shape and cast to its dtype, as the
    engine's ``validate_outputs`` does. Hooks are not run (no method uses any)."""
    from torch.autograd.function import BackwardCFunction

    root = loss.grad_fn
    deps: dict[object, int] = {}
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            deps[nxt] = deps.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    pending: dict[object, list] = {root: [torch.ones_like(loss)]}
    ready = [root]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            grads = pending.pop(node)
            if type(node).__name__ == "AccumulateGrad":
                var, g = node.variable, grads[0]
                if g is not None:
                    var.grad = g if var.grad is None else var.grad + g
            else:
                metas = node._input_metadata
                grads = grads + [None] * (len(metas) - len(grads))
                if isinstance(node, BackwardCFunction):  # a Python autograd.Function: materialise missing grads
                    grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                             for g, m in zip(grads, metas, strict=True)]
                    outs = node.apply(*grads)
                else:
                    outs = node(*grads)
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                for (nxt, slot), g in zip(node.next_functions, outs, strict=False):
                    if nxt is None:
                        continue
                    if g is not None:
                        want = nxt.variable if type(nxt).__name__ == "AccumulateGrad" else nxt._input_metadata[slot]
                        if g.device != want.device:
                            raise RuntimeError(f"{node.name()} returned a gradient on {g.device} for an input on "
                                               f"{want.device}")
                        if g.shape != want.shape:  # a broadcast input: the engine sums the gradient down to it
                            g = g.sum_to_size(want.shape)
                        g = g.to(want.dtype)
                    buf = pending.setdefault(nxt, [])
                    buf.extend([None] * (slot + 1 - len(buf)))
                    buf[slot] = g if buf[slot] is None else (buf[slot] if g is None else buf[slot] + g)
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    deps[nxt] -= 1
                    if deps[nxt] == 0:
                        ready.append(nxt)


def _step(model: nn.Module, x: torch.Tensor, train: bool, autocast: str, device: str,
          backward=lambda loss: loss.backward()) -> torch.Tensor:
    """One forward of ``model`` (lwbench's autocast wrapper, as runs and timing use it); in train mode also the
    backward of a loss on its output."""
    model.train(train)
    net = wrap(model, autocast, device)
    if not train:
        with torch.no_grad():
            return net(x)
    y = net(x)
    backward(y.float().square().mean())
    return y


@pytest.fixture
def cuda_autocast_without_gpu(monkeypatch):
    """``torch.autocast("cuda", dtype=torch.bfloat16)`` enabled on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@functools.cache
def _model(method: str) -> nn.Module:
    torch.manual_seed(0)
    return lwbench.create_model(method, BACKBONE, SIZE, None, num_classes=3)


def trace_on_fake_cuda(model: nn.Module, x: torch.Tensor, train: bool, autocast: str) -> nn.Module:
    """Run :func:`_step` on the CPU for real (recording), then on fake CUDA copies of ``model`` and ``x``
    (replaying); returns the fake model (its gradients hold the backward's result)."""
    rec = _Record()
    torch.manual_seed(0)
    with rec:
        _step(copy.deepcopy(model), x, train, autocast, "cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # a real CPU tensor in the forward becomes a fake CPU one
    fake = _to_fake_cuda(copy.deepcopy(model), mode)
    with mode, _Replay(rec.log):
        y = _step(fake, mode.from_tensor(x).to("cuda"), train, autocast, "cuda", backward=_backward)
        assert y.device.type == "cuda" and y.dtype == torch.float32
    return fake


MODES = [pytest.param(train, autocast, id=f"{'train' if train else 'eval'}-{autocast}")
         for train in (False, True) for autocast in ("none", "bfloat16")]


@pytest.mark.parametrize("train,autocast", MODES)
@pytest.mark.parametrize("method", lwbench.list_methods())
def test_method_runs_on_fake_cuda(method, train, autocast, cuda_autocast_without_gpu):
    x = torch.rand(BATCH, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    fake = trace_on_fake_cuda(_model(method), x, train, autocast)
    if train:
        grads = [(n, p.grad) for n, p in fake.named_parameters() if p.grad is not None]
        assert grads, f"{method}: no parameter got a gradient"
        wrong = [n for n, g in grads if g.device.type != "cuda"]
        assert not wrong, f"{method}: gradients off the GPU: {wrong}"


class _MadeOnCpu(nn.Module):
    """The bug this file exists for: a position index made on the CPU inside the forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(SIZE[1], 3)

    def forward(self, x):
        return self.lin(x + torch.arange(x.shape[-1]))


class _CpuGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.ones(g.shape)  # on the CPU whatever the device of g


class _BackwardOnCpu(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(SIZE[1], 3)

    def forward(self, x):
        return self.lin(_CpuGradient.apply(x.requires_grad_()))


@pytest.mark.parametrize("train", [False, True])
def test_a_tensor_made_on_the_cpu_in_the_forward_fails(train, cuda_autocast_without_gpu):
    x = torch.rand(BATCH, 3, *SIZE)
    with pytest.raises(RuntimeError, match="device"):
        trace_on_fake_cuda(_MadeOnCpu(), x, train, "none")


def test_a_gradient_made_on_the_cpu_fails():
    x = torch.rand(BATCH, 3, *SIZE)
    with pytest.raises(RuntimeError, match="gradient on cpu"):
        trace_on_fake_cuda(_BackwardOnCpu(), x, True, "none")


def test_the_fake_run_replays_the_cpu_runs_data_dependent_reads():
    class Reads(nn.Module):
        def forward(self, x):
            k = int((x > 0.5).sum(dim=1).max())  # a scalar read
            return x[:, :k] * 2, x[x > 0.5]  # a data-dependent shape

    x = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.9, 0.1, 0.1, 0.2]])
    rec = _Record()
    with rec:
        Reads()(x)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, _Replay(rec.log):
        a, b = Reads()(mode.from_tensor(x).to("cuda"))
    assert a.shape == (2, 2) and b.shape == (3,) and a.device.type == b.device.type == "cuda"


@pytest.mark.parametrize("method", ["dps", "lookwhere"])  # a Python autograd.Function; the most nodes
def test_python_backward_gives_autograds_gradients(method):
    x = torch.rand(BATCH, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    ref, ours = copy.deepcopy(_model(method)), copy.deepcopy(_model(method))
    torch.manual_seed(0)
    _step(ref, x, True, "none", "cpu")
    torch.manual_seed(0)
    _step(ours, x, True, "none", "cpu", backward=_backward)
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
