"""GMACs (multiply-accumulates) of a model on a given input, three independent ways.

Convention: one multiply-add = one MAC, which is what fvcore calls a "flop" and what the
LookWhere paper and most token-reduction papers report as "GFLOPs". Only the work of
matrix products is counted: linear layers, convolutions, ``matmul``/``bmm``/``einsum`` and
attention. Normalisations, activations, softmax, residual adds and interpolation are
elementwise, cost well under 1 % of a ViT, and are left uncounted as usual in the field; every
such op that ran is listed in the report so nothing is dropped silently.

One exception, so that a cheap selector is never free: an :class:`~lwbench.method.Overhead` module whose work
*is* elementwise (a pixel statistic: ``saliency``'s variance or edge energy per patch) says so with
``counts_elementwise = True``, and its elementwise ops are counted, one MAC per element of the op's largest
operand. Other modules, the backbone and learned selectors and matchers included, keep the field's convention, so
their GMACs stay comparable with published numbers (and the two counters, which attribute ops to modules
differently, agree exactly on them).

Why three counters:

- :func:`count_macs` (fvcore, with extra handles) is the reported number. Stock fvcore counts
  fused attention (``aten::scaled_dot_product_attention``) as zero, which drops
  ``2 N^2 d`` MACs per block: 22.3 instead of 23.54 GMACs for DINOv2 ViT-B/14-reg4 at 224 px.
- :func:`torch_counter_macs` (``torch.utils.flop_counter``) is a second implementation. It has no
  formula for the CPU fused kernel (``aten._scaled_dot_product_flash_attention_for_cpu``), so
  it misses attention on CPU too unless we register one, which we do.
- :func:`closed_form_vit_macs` is the textbook count for timm's ViT. Tests hold the three equal.

Methods may be data-dependent (ToMe, ATS, LookWhere): a count holds for the input it was traced
with; :func:`mean_macs_over` averages over several images at batch 1.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lwbench.errors import LwbenchError
from lwbench.method import Overhead
from lwbench.sizes import as_hw

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


class FlopCountError(LwbenchError, RuntimeError):
    """The MAC count cannot be trusted (ops with real work and no formula)."""


# -- op classification ---------------------------------------------------------------------------
# Ops that move or index memory, draw random numbers or compare: no arithmetic worth counting.
# (fvcore already ignores view/reshape/cat/gather/... ; these are the ones our methods add.)
ZERO_WORK_OPS: frozenset[str] = frozenset({
    "aten::topk", "aten::sort", "aten::argsort", "aten::argmax", "aten::argmin", "aten::scatter", "aten::scatter_",
    "aten::index_select", "aten::masked_select", "aten::take_along_dim", "aten::im2col", "aten::col2im",
    "aten::unfold", "aten::repeat", "aten::repeat_interleave", "aten::tile", "aten::expand_as", "aten::flip",
    "aten::new_ones", "aten::ones_like", "aten::empty_like", "aten::rand", "aten::randn", "aten::randint",
    "aten::rand_like", "aten::randn_like", "aten::randperm", "aten::bernoulli", "aten::multinomial", "aten::lt",
    "aten::le", "aten::ne", "aten::logical_and", "aten::logical_or", "aten::logical_not", "aten::bitwise_and",
    "aten::bitwise_or", "aten::__or__", "aten::__ior__", "aten::__iand__", "aten::where", "aten::any", "aten::all",
    "aten::clone", "aten::fill_", "aten::zero_", "aten::lift_fresh", "aten::alias", "aten::unflatten",
    "aten::movedim", "aten::view_as", "aten::reshape_as", "aten::_unsafe_view", "aten::as_strided",
    "aten::masked_fill_", "aten::index_put", "aten::resolve_conj", "aten::resolve_neg", "aten::detach_",
    "aten::embedding", "aten::linspace", "aten::meshgrid", "aten::one_hot", "aten::sign", "aten::floor_",
    "aten::round", "aten::ceil", "aten::scatter_reduce", "aten::searchsorted", "aten::bucketize", "aten::unique",
    "aten::unique_dim", "aten::_unique2", "aten::cumsum_", "aten::numpy_T", "aten::mT", "aten::swapaxes",
    "aten::contiguous", "aten::pad", "aten::reflection_pad2d", "aten::replication_pad2d", "aten::diagonal",
    "aten::tril", "aten::triu", "aten::eye", "aten::new_tensor", "aten::tensor", "aten::scalar_tensor",
    "aten::lerp_", "aten::isnan", "aten::isinf", "aten::isfinite", "aten::nan_to_num",
    "aten::feature_dropout",  # nn.Dropout2d (mmseg's decode heads): the identity in eval mode
})

# Elementwise / normalisation / reduction ops: real but O(numel) work, uncounted by convention, listed.
ELEMENTWISE_OPS: frozenset[str] = frozenset({
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::neg", "aten::abs", "aten::exp", "aten::exp_", "aten::log", "aten::log_", "aten::log1p",
    "aten::sqrt", "aten::rsqrt", "aten::pow", "aten::square", "aten::reciprocal", "aten::gelu", "aten::gelu_",
    "aten::silu", "aten::silu_", "aten::hardtanh", "aten::hardswish", "aten::leaky_relu", "aten::sigmoid",
    "aten::sigmoid_", "aten::tanh", "aten::softplus", "aten::erf", "aten::softmax", "aten::_softmax",
    "aten::log_softmax", "aten::layer_norm", "aten::batch_norm", "aten::group_norm", "aten::instance_norm",
    "aten::rms_norm", "aten::norm", "aten::linalg_vector_norm", "aten::frobenius_norm", "aten::sum", "aten::mean",
    "aten::var", "aten::std", "aten::cumsum", "aten::cumprod", "aten::amax", "aten::amin", "aten::min",
    "aten::clamp_min", "aten::clamp_max", "aten::minimum", "aten::maximum", "aten::upsample_bilinear2d",
    "aten::upsample_bicubic2d", "aten::upsample_nearest2d", "aten::_upsample_bilinear2d_aa",
    "aten::_upsample_bicubic2d_aa", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::avg_pool1d",
    "aten::avg_pool2d", "aten::max_pool2d", "aten::adaptive_max_pool2d", "aten::grid_sampler", "aten::dropout_",
    "aten::scatter_add", "aten::scatter_add_", "aten::index_add", "aten::index_add_", "aten::addcmul",
    "aten::addcdiv", "aten::lerp", "aten::logsumexp", "aten::prod", "aten::sin", "aten::cos", "aten::atan2",
    "aten::gumbel_softmax", "aten::relu6", "aten::elu", "aten::hardsigmoid", "aten::cosine_similarity",
    "aten::normalize", "aten::prelu", "aten::glu", "aten::logit", "aten::softmin", "aten::fmod",
})


def _fvcore():
    """``fvcore.nn``, imported without the FutureWarning its ``torch.jit.script`` use triggers in the CLI."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import fvcore.nn
        import fvcore.nn.jit_analysis
        import fvcore.nn.jit_handles
    return fvcore.nn


def _shape(val: Any) -> list[int]:
    shape = _fvcore().jit_handles.get_shape(val)
    if shape is None:
        raise FlopCountError(f"fvcore trace has no shape for {val}; cannot count MACs")
    return list(shape)


def _contract_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``linear``/``matmul``/``mm``/``bmm``: output elements x contracted dimension (first operand's last)."""
    a = _shape(inputs[0])
    return math.prod(_shape(outputs[0])) * (a[-1] if a else 1)


def _addmm_like_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``addmm``/``baddbmm``/``addmv``: ``bias + a @ b`` with ``a`` as the second input."""
    a = _shape(inputs[1])
    return math.prod(_shape(outputs[0])) * a[-1]


def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """Fused attention: ``q k^T`` (Nq x Nk x dqk) plus ``attn v`` (Nq x Nk x dv) per head, i.e.
    B*H*Nq*Nk*(dqk + dv). Softmax and scaling are elementwise and uncounted."""
    return sdpa_macs(_shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]))


def _cdist_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """Pairwise distances cost one MAC per (pair, channel), like the similarity matmul they replace."""
    return math.prod(_shape(outputs[0])) * _shape(inputs[0])[-1]


def sdpa_macs(q: list[int] | torch.Size, k: list[int] | torch.Size, v: list[int] | torch.Size) -> int:
    """MACs of ``softmax(q k^T) v`` for shapes ``(..., Nq, dqk)``, ``(..., Nk, dqk)``, ``(..., Nk, dv)``.

    Leading dims are the query's (batch, heads): with grouped-query attention the keys are
    broadcast to every query head, which still pays for every head."""
    q, k, v = list(q), list(k), list(v)
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _fvcore_handles() -> dict[str, Any]:
    jit_handles = _fvcore().jit_handles
    return {
        "aten::linear": _contract_handle,
        "aten::matmul": _contract_handle,
        "aten::mm": _contract_handle,
        "aten::bmm": _contract_handle,
        "aten::mv": _contract_handle,
        "aten::dot": _contract_handle,
        "aten::addmm": _addmm_like_handle,
        "aten::baddbmm": _addmm_like_handle,
        "aten::addmv": _addmm_like_handle,
        "aten::einsum": jit_handles.einsum_flop_jit,
        "aten::_convolution": jit_handles.conv_flop_jit,
        "aten::scaled_dot_product_attention": _sdpa_handle,
        "aten::cdist": _cdist_handle,
    }


# -- counting ----------------------------------------------------------------------------------------
@dataclass
class MacReport:
    """MACs per image of one model on one input (or the mean over several).

    Attributes:
        macs: multiply-accumulates per image.
        parts: MACs per image split into ``overhead`` (every :class:`~lwbench.method.Overhead`
            submodule: selector, scorer, matcher), ``head`` (the model's ``head`` child) and
            ``backbone`` (the rest). They sum to ``macs``. With fvcore an op belongs to the module
            that *owns* the submodule it ran in (a scorer owned by an Overhead is overhead wherever
            it is called from); with the torch counter it belongs to the modules on the call stack.
        params: parameters in millions (shared parameters counted once).
        by_operator: MACs per image per counted operator.
        uncounted_ops: elementwise ops that ran and are not counted by convention.
        unsupported_ops: ops that ran, are not known to be free, and have no formula. Should be empty.
        images: how many images the numbers average over.
        counter: ``"fvcore"`` or ``"torch"`` (fallback for models jit tracing cannot handle).
    """

    macs: float
    parts: dict[str, float]
    params: float
    by_operator: dict[str, float] = field(default_factory=dict)
    uncounted_ops: list[str] = field(default_factory=list)
    unsupported_ops: list[str] = field(default_factory=list)
    images: int = 1
    counter: str = "fvcore"

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def parts_gmacs(self) -> dict[str, float]:
        return {k: v / 1e9 for k, v in self.parts.items()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _overhead_modules(model: nn.Module, elementwise_only: bool = False) -> list[str]:
    """Names of outermost ``Overhead`` submodules (a nested one is already inside its parent); with
    ``elementwise_only``, of those that declare their elementwise work (``counts_elementwise``)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, Overhead) and (not elementwise_only or m.counts_elementwise)]
    return [n for n in names if not any(n != o and (o == "" or n.startswith(o + ".")) for o in names)]


def _split_ops(unsupported: Counter) -> tuple[list[str], list[str]]:
    ops = [op for op in unsupported if op not in ZERO_WORK_OPS]
    return sorted(op for op in ops if op in ELEMENTWISE_OPS), sorted(op for op in ops if op not in ELEMENTWISE_OPS)


def _as_number(total: float, batch: int) -> float:
    """``total / batch``, kept an exact int when it divides (counts are compared exactly in tests)."""
    if isinstance(total, int) and total % batch == 0:
        return total // batch
    return total / batch


def _mean(values: list[float]) -> float:
    return _as_number(sum(values), len(values))


def _parts(total: int, module_total, model: nn.Module) -> dict[str, int]:
    """Split ``total`` into overhead / head / backbone given ``module_total(name)`` per submodule."""
    overhead_names = _overhead_modules(model)
    overhead = sum(int(module_total(n)) for n in overhead_names)
    head = 0
    if isinstance(getattr(model, "head", None), nn.Module):
        head = int(module_total("head")) - sum(int(module_total(n)) for n in overhead_names if n.startswith("head."))
    return {"backbone": total - overhead - head, "overhead": overhead, "head": head}


#: ``by_operator`` key of the elementwise work counted inside Overhead modules (see the module docstring).
OVERHEAD_ELEMENTWISE = "elementwise in overhead"


def _elementwise_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """One MAC per element of the op's largest tensor operand (inputs or outputs). Zero-dim operands are shape
    arithmetic the tracer records (``h // p * w // p``), not work: they count 0, as the torch counter never sees
    them."""
    get_shape = _fvcore().jit_handles.get_shape
    sizes = [math.prod(s) for v in list(inputs) + list(outputs) if (s := get_shape(v))]
    return max(sizes, default=0)


def _add_overhead(total: int, parts: dict[str, int], by_op: dict, extra: int) -> int:
    if extra:
        parts["overhead"] += extra
        by_op[OVERHEAD_ELEMENTWISE] = by_op.get(OVERHEAD_ELEMENTWISE, 0) + extra
    return total + extra


def _fvcore_analysis(model: nn.Module, inputs: Inputs, handles: dict[str, Any]):
    fca = _fvcore().FlopCountAnalysis(model, inputs)
    fca.clear_op_handles()
    fca.set_op_handle(**handles)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    fca.tracer_warnings("none")
    return fca


def _overhead_elementwise_fvcore(model: nn.Module, inputs: Inputs) -> int:
    """Elementwise MACs inside the Overhead modules that count them (a second trace, only when there are any)."""
    names = _overhead_modules(model, elementwise_only=True)
    if not names:
        return 0
    fca = _fvcore_analysis(model, inputs, {op: _elementwise_handle for op in ELEMENTWISE_OPS})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(int(fca.total(n)) for n in names)


def _count_fvcore(model: nn.Module, inputs: Inputs) -> tuple[int, dict[str, int], dict, list[str], list[str]]:
    fca = _fvcore_analysis(model, inputs, _fvcore_handles())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = int(fca.total())
        parts = _parts(total, fca.total, model)
        uncounted, unsupported = _split_ops(fca.unsupported_ops())
        by_op = {k: int(v) for k, v in fca.by_operator().items()}
    total = _add_overhead(total, parts, by_op, _overhead_elementwise_fvcore(model, inputs))
    return total, parts, by_op, uncounted, unsupported


# Dispatcher-level names (what FlopCounterMode sees) of ops fvcore sees under their public names.
_DISPATCH_ZERO_WORK = frozenset({
    "aten::_to_copy", "aten::_local_scalar_dense", "aten::copy_", "aten::lift_fresh", "aten::new_zeros",
    "aten::empty_strided", "aten::_reshape_alias", "aten::split", "aten::clamp", "aten::bitwise_not", "aten::ge",
    "aten::gt", "aten::eq", "aten::max", "aten::_unique2",
})
_DISPATCH_ELEMENTWISE = frozenset({
    "aten::native_layer_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit_no_training",
    "aten::native_group_norm", "aten::_log_softmax", "aten::_softmax", "aten::_fused_rms_norm",
    "aten::_adaptive_avg_pool2d", "aten::max_pool2d_with_indices",  # pooling (UPerHead's PPM, the pyramid's max-pool)
})


class _OpRecorder:
    """Names of every aten op that runs (the torch counter only records the ones it has formulas for)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        ops: set[str] = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.add("aten::" + func._overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.ops = ops
        self._mode = Mode()

    def __enter__(self) -> _OpRecorder:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _classify_dispatch_ops(ops: set[str], counted: set[str]) -> tuple[list[str], list[str]]:
    _IGNORED_OPS = _fvcore().jit_analysis._IGNORED_OPS  # fvcore's own list of free ops

    rest = {op for op in ops if op not in counted and op not in ZERO_WORK_OPS and op not in _IGNORED_OPS
            and op not in _DISPATCH_ZERO_WORK}
    elementwise = ELEMENTWISE_OPS | _DISPATCH_ELEMENTWISE
    return sorted(op for op in rest if op in elementwise), sorted(op for op in rest if op not in elementwise)


def _count_torch(model: nn.Module, inputs: Inputs) -> tuple[int, dict[str, int], dict, list[str], list[str]]:
    """Total MACs, overhead/head/backbone split, per-op MACs and the uncounted / unsupported ops, with
    FlopCounterMode (eager, no tracing)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_sdpa_formulas())
    # The recorder sits below the counter: it sees the ops the counter lets through (after decomposition).
    with _OpRecorder() as rec, counter, torch.no_grad():
        model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__  # ModuleTracker names the root by its class, children by attribute path

    def module_total(name: str) -> int:
        return sum(counts.get(f"{root}.{name}" if name else root, {}).values()) // 2

    total = int(counter.get_total_flops()) // 2
    by_op = {str(k): int(v) // 2 for k, v in counts.get("Global", {}).items()}
    counted = {"aten::" + getattr(k, "__name__", str(k)) for k in counter.flop_registry}
    uncounted, unsupported = _classify_dispatch_ops(rec.ops, counted)
    parts = _parts(total, module_total, model)
    total = _add_overhead(total, parts, by_op, _overhead_elementwise_torch(model, inputs))
    return total, parts, by_op, uncounted, unsupported


def _elementwise_flops(*args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula (FLOPs = 2 x MACs): one MAC per element of the largest operand."""
    sizes: list[int] = []

    def walk(v: Any) -> None:  # pytree would flatten a torch.Size (a tuple) into its ints
        if isinstance(v, torch.Size):
            sizes.append(math.prod(v) if len(v) else 0)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)

    walk((args, kwargs, out_shape))
    return 2 * max(sizes, default=0)


def _overhead_elementwise_torch(model: nn.Module, inputs: Inputs) -> int:
    """:func:`_overhead_elementwise_fvcore` with FlopCounterMode: a counter that knows only elementwise ops, read
    at those modules (modules on the call stack, as the torch counter attributes everything)."""
    from torch.utils.flop_counter import FlopCounterMode

    names = _overhead_modules(model, elementwise_only=True)
    if not names:
        return 0
    aten = torch.ops.aten
    ops = {getattr(aten, op.removeprefix("aten::")) for op in ELEMENTWISE_OPS | _DISPATCH_ELEMENTWISE
           if hasattr(aten, op.removeprefix("aten::"))}
    mapping = {op: _elementwise_flops for op in ops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.no_grad():
        model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return sum(int(v) for n in names for op, v in counts.get(f"{root}.{n}", {}).items() if op in ops) // 2


def _batch(inputs: Inputs) -> int:
    """Images in ``inputs``: the leading dim of an image batch; a tuple of arguments counts as one."""
    return 1 if isinstance(inputs, tuple) else int(inputs.shape[0])


def count_macs(model: nn.Module, inputs: Inputs, counter: str = "fvcore") -> MacReport:
    """MACs per image of ``model(inputs)``, attention included. See the module docstring.

    ``inputs`` is an image batch (counts are divided by its size) or a tuple of positional
    arguments (counts are for the whole call).

    ``counter="fvcore"`` (the default) traces the model with ``torch.jit``; a model that cannot be
    traced is counted with ``torch.utils.flop_counter`` instead, with a warning, and the report
    says which counter was used. ``counter="torch"`` asks for the latter directly.

    The count is for this input: data-dependent methods may cost more or less on other images
    (use :func:`mean_macs_over`). An ``Overhead`` submodule's MACs are attributed to it only
    when its work runs inside its own ``forward`` (both counters scope ops by module call).
    """
    was_training = model.training
    model.eval()
    uncounted: list[str] = []
    unsupported: list[str] = []
    used = counter
    try:
        if counter == "fvcore":
            try:
                total, parts, by_op, uncounted, unsupported = _count_fvcore(model, inputs)
            except Exception as exc:  # jit tracing chokes on some Python (e.g. shapes become tensors)
                warnings.warn(f"lwbench: fvcore could not trace {type(model).__name__} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); counting with torch.utils.flop_counter",
                              stacklevel=2)
                used = "torch"
        if used == "torch":
            total, parts, by_op, uncounted, unsupported = _count_torch(model, inputs)
        elif used != "fvcore":
            raise ValueError(f"counter must be 'fvcore' or 'torch', not {counter!r}")
    finally:
        model.train(was_training)
    b = _batch(inputs)
    return MacReport(
        macs=_as_number(total, b),
        parts={k: _as_number(v, b) for k, v in parts.items()},
        params=count_params(model) / 1e6,
        by_operator={k: _as_number(v, b) for k, v in by_op.items()},
        uncounted_ops=uncounted,
        unsupported_ops=unsupported,
        counter=used,
    )


def mean_macs_over(
    model: nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor, counter: str = "fvcore"
) -> MacReport:
    """Mean of :func:`count_macs` over every image in ``batches``, each traced at batch 1.

    Data-dependent methods (ToMe's merges are exact counts, but ATS/A-ViT/LookWhere-style
    adaptive budgets are not) cost what they cost on real images, so average over the
    evaluation images rather than one random input."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    reports = [count_macs(model, batch[i: i + 1], counter) for batch in batches for i in range(batch.shape[0])]
    if not reports:
        raise FlopCountError("mean_macs_over got no images")
    n = len(reports)
    ops: Counter = Counter()
    for r in reports:
        ops.update(r.by_operator)
    return MacReport(
        macs=_mean([r.macs for r in reports]),
        parts={k: _mean([r.parts[k] for r in reports]) for k in reports[0].parts},
        params=reports[0].params,
        by_operator={k: _as_number(v, n) for k, v in ops.items()},
        uncounted_ops=sorted({op for r in reports for op in r.uncounted_ops}),
        unsupported_ops=sorted({op for r in reports for op in r.unsupported_ops}),
        images=n,
        counter="fvcore" if all(r.counter == "fvcore" for r in reports) else "torch",
    )


# -- closed form -----------------------------------------------------------------------------------
def closed_form_vit_macs(
    depth: int,
    dim: int,
    mlp_hidden: int,
    num_tokens: int,
    num_patches: int,
    patch: int,
    in_chans: int = 3,
    num_classes: int = 0,
) -> int:
    """Exact MACs of one image through timm's VisionTransformer (matrix products only).

    With N = ``num_tokens`` (patches + CLS + registers) in every block, d = ``dim``,
    h = ``mlp_hidden``::

        patch embedding   num_patches * d * in_chans * patch^2     (the stride-p convolution)
        per block         qkv 3 N d^2 + q k^T N^2 d + attn v N^2 d + proj N d^2 + MLP 2 N d h
                          = 4 N d^2 + 2 N^2 d + 2 N d h
        head              d * num_classes                          (linear on the CLS token)

    ``num_patches`` and ``num_tokens`` differ when a method embeds only some patches, or when
    prefix tokens are added; biases, norms, GELU, softmax and LayerScale are elementwise and
    not counted, as in :func:`count_macs`.
    """
    n, d, h = int(num_tokens), int(dim), int(mlp_hidden)
    embed = int(num_patches) * d * int(in_chans) * int(patch) ** 2
    block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * h
    return embed + int(depth) * block + d * int(num_classes)


def closed_form_for(vit: nn.Module, img_size, num_classes: int = 0, num_patches: int | None = None) -> int:
    """:func:`closed_form_vit_macs` for a timm ViT at ``img_size``, all patches unless ``num_patches`` given."""
    h, w = as_hw(img_size)
    p = int(vit.patch_embed.patch_size[0])
    m = (h // p) * (w // p) if num_patches is None else int(num_patches)
    d = int(vit.embed_dim)
    # MLP MACs per token from its linear layers: 2 d h for timm's Mlp, 3 d h for a SwiGLU (EVA-02)
    mlp = sum(lin.in_features * lin.out_features for lin in vit.blocks[0].mlp.modules() if isinstance(lin, nn.Linear))
    hidden, rest = divmod(mlp, 2 * d)
    n = m + int(vit.num_prefix_tokens)
    return closed_form_vit_macs(
        depth=len(vit.blocks),
        dim=d,
        mlp_hidden=hidden,
        num_tokens=n,
        num_patches=m,
        patch=p,
        in_chans=int(vit.patch_embed.proj.in_channels),
        num_classes=num_classes,
    ) + len(vit.blocks) * n * rest


# -- torch.utils.flop_counter ------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_macs(query_shape, key_shape, value_shape)


def _sdpa_formulas() -> dict[Any, Any]:
    """Formulas for every SDPA entry point, including the CPU fused kernel torch has none for.

    The public op is registered too: then FlopCounterMode counts it once and does not descend
    into whichever kernel it dispatches to (flash, efficient, math, or the CPU one)."""
    aten = torch.ops.aten
    names = [
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    return {getattr(aten, n): _sdpa_flops for n in names if hasattr(aten, n)}


def torch_counter_macs(model: nn.Module, inputs: Inputs) -> float:
    """MACs per image with ``torch.utils.flop_counter.FlopCounterMode`` (its FLOPs / 2), attention included."""
    was_training = model.training
    model.eval()
    try:
        total = _count_torch(model, inputs)[0]
    finally:
        model.train(was_training)
    return _as_number(total, _batch(inputs))


__all__ = [
    "MacReport", "FlopCountError", "count_macs", "mean_macs_over", "closed_form_vit_macs", "closed_form_for",
    "torch_counter_macs", "sdpa_macs", "count_params",
]
