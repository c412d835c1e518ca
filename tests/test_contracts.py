"""Contracts every registered method meets, parametrised over ``METHODS.names()`` like timm's tests over
``list_models``, plus a third-party method loaded from a file (``tests/plugins/contract_plugin.py``).

For every method:

* **No-op budget = the plain backbone, bit for bit.** At its no-op budget (k = all patches, r = 0,
  keep_rate = 1, size = the high-res height; ``full`` at its only setting) the encoder's ``TokenOutput`` is
  timm's ``forward_features`` split into prefix and patches, on the plain grid order, with nothing masked or
  merged, and every task head reads the same logits through :class:`~lwbench.heads.TaskModel`. Compared with
  ``torch.equal``: at a no-op budget a method must take timm's own modules in timm's order (each method
  documents this), so there is no rounding to allow for, and a tolerance would hide a real difference (e.g. a
  subset-embedding path taken when every patch is kept). A method without a meaningful no-op says so in
  its ``noop_note``, and the part of it that must still be the backbone (:data:`BACKBONE_PARTS`) is checked
  instead. The no-op budget is the method's own (``Method.noop_budget``): a new method with a budget knob fails
  until it declares one.
* **FLOP parts sum to the total** on a tiny config (``lwbench flops``' own path), are non-negative, and the
  two counters split the total the same way.
* **An impossible budget fails before any work**: ``cls(spec, budget)`` raises ``BudgetError``/``ConfigError``
  with a one-line message and no ``nn.Module`` is constructed.
* **Metadata**: description, ``kind``, ``training``, ``budget_key`` are valid and every ``budget_grid``
  value (and the default budget) passes ``check_budget``, which only checks: it leaves the method's ``__dict__``
  as it found it.

Known library defects are ``xfail(strict=True)`` cases listed in :data:`KNOWN_DEFECTS`: fixing the library
turns them into XPASS failures, which is the cue to delete the entry.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from _toy import make
from torch import nn

from lwbench.errors import BudgetError, ConfigError
from lwbench.flops_report import flops_report, random_model
from lwbench.heads import ClassifierHead, LinearSegHead, TaskModel
from lwbench.measure.flops import count_macs
from lwbench.method import BackboneSpec, Training, resolve_budget
from lwbench.registry import METHODS
from lwbench.tokens import TokenOutput
from lwbench.vit import all_positions, grid_of, prefix_tokens

PLUGIN_PATH = Path(__file__).parent / "plugins" / "contract_plugin.py"
PLUGIN = "contract_plugin_drop"
PLUGIN_BUDGET_KEY = "k"  # needed at collection; the plugin itself is loaded at run time (see ``methods``)

# The plugin is registered only while this module's tests run, so other files collect the same methods
# whether or not this file is collected too (tests/test_flops.py parametrises over METHODS.names()).
NAMES = sorted(set(METHODS.names()) | {PLUGIN})

TINY = "lw_vit_test_p8"
TINY_SIZE = (32, 48)  # 4 x 6 grid, CLS + 4 registers, LayerScale, 2 blocks
NUM_CLASSES = 3


def _budget_key(name: str) -> str | None:
    return PLUGIN_BUDGET_KEY if name == PLUGIN else METHODS.get(name).budget_key


@pytest.fixture(scope="module")
def methods():
    """``METHODS`` with the test plugin loaded from its file, as ``--plugin path.py`` does."""
    had = PLUGIN in METHODS.names()
    METHODS.load_module(str(PLUGIN_PATH))
    yield METHODS
    if not had:  # the Registry has no public way to unregister (a test-scoped registry would be nicer)
        METHODS._classes.pop(PLUGIN, None)
        METHODS._origins.pop(PLUGIN, None)


def _classic():
    """Original timm layout: CLS only, position embedding over CLS and patches, no LayerScale, patch 16."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=(32, 48), depth=2,
                            embed_dim=32, num_heads=2).eval()
    return vit, BackboneSpec.of(vit, "vit_base_patch16_224", (32, 48))


BACKBONES: dict[str, Callable[[], tuple[nn.Module, BackboneSpec]]] = {
    TINY: lambda: make(TINY, TINY_SIZE),  # DINOv2 layout (CLS + 4 registers, LayerScale), 4 x 6 patches of 8
    "vit_classic_p16": _classic,  # 2 x 3 patches of 16
}


@pytest.fixture(scope="module", params=list(BACKBONES), ids=list(BACKBONES))
def backbone(request):
    vit, spec = BACKBONES[request.param]()
    return vit, spec


@pytest.fixture(scope="module")
def tiny():
    return make(TINY, TINY_SIZE)


# -- the no-op table ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoOp:
    """At ``budget(spec)`` the method is the plain backbone, bit for bit."""

    budget: Callable[[BackboneSpec], float | None]


@dataclass(frozen=True)
class NoNoOp:
    """The method has no budget at which it is the backbone; ``part(encoder, x)`` is what must still be."""

    budget: Callable[[BackboneSpec], float | None]  # the budget closest to a no-op
    reason: str
    part: Callable[[nn.Module, torch.Tensor], TokenOutput]


def _lookwhere_extractor(enc: nn.Module, x: torch.Tensor) -> TokenOutput:
    vit = enc.extractor.vit
    return enc.extractor(x, all_positions(x.shape[0], grid_of(vit, x), x.device), prefix_tokens(vit, x.shape[0]))


# For a method without a no-op (its ``noop_note`` says why): the part of its encoder that must still be the backbone.
BACKBONE_PARTS: dict[str, Callable[[nn.Module, torch.Tensor], TokenOutput]] = {"lookwhere": _lookwhere_extractor}


def noop_of(cls) -> NoOp | NoNoOp:
    """The method's own ``noop_budget`` (and ``noop_note``), as the entry the no-op tests check."""
    if cls.noop_note:
        return NoNoOp(cls.noop_budget, reason=cls.noop_note, part=BACKBONE_PARTS[cls.name])
    return NoOp(cls.noop_budget)


NOOP: dict[str, NoOp | NoNoOp] = {name: noop_of(METHODS.get(name)) for name in METHODS.names()}

# (method, case id) -> reason, for cases that fail today because of a library defect (xfail, strict).
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}
# Methods whose overhead/backbone/head split differs between the fvcore and torch counters.
SPLIT_DEFECTS: dict[str, str] = {
    "ips": "IPSEncoder calls selector.summary() (the aggregator, an Overhead's submodule) outside the selector's "
    "forward: fvcore books it as overhead, torch.utils.flop_counter as backbone",
}


def _xfail(reason: str | None):
    return () if reason is None else (pytest.mark.xfail(strict=True, reason=reason),)


def _heads(dim: int) -> dict[str, nn.Module]:
    torch.manual_seed(1)
    heads: dict[str, nn.Module] = {f"cls_{p}": ClassifierHead(dim, NUM_CLASSES, p) for p in ClassifierHead.POOLS}
    heads["seg"] = LinearSegHead(dim, NUM_CLASSES)
    return {k: h.eval() for k, h in heads.items()}


def _logits(model_or_head: nn.Module, arg, size) -> torch.Tensor:
    return model_or_head(arg, size=size)


def _reference(vit: nn.Module, spec: BackboneSpec, x: torch.Tensor) -> TokenOutput:
    """timm's ``forward_features`` as a TokenOutput: prefix, patches in grid order, nothing masked or merged."""
    feats = vit.forward_features(x)
    p = spec.num_prefix
    n = spec.num_patches
    return TokenOutput(feats[:, :p], feats[:, p:], torch.arange(n).expand(x.shape[0], n), spec.grid)


def _assert_is_backbone(out: TokenOutput, ref: TokenOutput, what: str) -> None:
    n = ref.positions.shape[1]
    assert out.grid == ref.grid, f"{what}: grid"
    assert torch.equal(out.prefix, ref.prefix), f"{what}: prefix (CLS + registers) differs from forward_features"
    assert out.patches.shape == ref.patches.shape, f"{what}: {out.patches.shape[1]} patch tokens, not {n}"
    assert torch.equal(out.patches, ref.patches), f"{what}: patch tokens differ from forward_features"
    assert torch.equal(out.positions, ref.positions), f"{what}: positions are not the plain grid order"
    assert out.mask is None or bool(out.mask.all()), f"{what}: tokens masked"
    assert out.sizes is None or bool((out.sizes == 1).all()), f"{what}: tokens merged (sizes)"
    assert out.assignment is None or torch.equal(out.assignment, ref.positions), f"{what}: assignment"


# -- 1. no-op budget -----------------------------------------------------------------------------------------
def test_every_method_declares_its_noop(methods, tiny):
    """A method with a budget knob says at which budget it is the backbone (``Method.noop_budget``); one without a
    no-op says why (``noop_note``) and names the part that must still be the backbone here (BACKBONE_PARTS)."""
    _, spec = tiny
    for name in NAMES:
        cls = methods.get(name)
        budget = cls.noop_budget(spec)
        assert (budget is None) == (cls.budget_key is None), f"{name}: no-op budget {budget!r}"
        assert not cls.noop_note or name in BACKBONE_PARTS, f"{name}: noop_note without a part to check"


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_noop_budget_reproduces_backbone(methods, backbone, name):
    vit, spec = backbone
    cls = methods.get(name)
    entry = noop_of(cls)
    x = torch.randn(2, 3, *spec.img_size, generator=torch.Generator().manual_seed(0))
    ref = _reference(vit, spec, x)
    enc = cls(spec, entry.budget(spec)).build(vit).eval()
    out = enc(x)
    if isinstance(entry, NoNoOp):
        same = out.prefix.shape == ref.prefix.shape and out.patches.shape == ref.patches.shape and torch.equal(
            torch.cat([out.prefix, out.patches], 1), torch.cat([ref.prefix, ref.patches], 1))
        assert not same, f"{name} now reproduces the backbone: replace its NoNoOp ({entry.reason}) by a NoOp"
        _assert_is_backbone(entry.part(enc, x), ref, f"{name} (the part that must be the backbone)")
        return
    _assert_is_backbone(out, ref, name)
    size = tuple(spec.img_size)
    for head_name, head in _heads(spec.embed_dim).items():
        got = TaskModel(enc, head).eval()(x)
        assert torch.equal(got, _logits(head, ref, size)), f"{name}: {head_name} head logits"


# -- 2. FLOP parts -------------------------------------------------------------------------------------------
def _reducing_budget(cls, spec: BackboneSpec) -> str | None:
    """A budget that does reduce (the middle of the method's default grid), as ``--budget`` text."""
    if cls.budget_key is None:
        return None
    grid = cls.budget_grid(spec)
    value = grid[len(grid) // 2]
    return f"{cls.budget_key}={value:g}"


@pytest.mark.parametrize("name", NAMES)
def test_flop_parts_sum_to_total(methods, tiny, name):
    _, spec = tiny
    budget = _reducing_budget(methods.get(name), spec)
    d = flops_report(name, TINY, TINY_SIZE, budget=budget, num_classes=NUM_CLASSES)
    parts = d["parts_gmacs"]
    assert set(parts) == {"overhead", "backbone", "head"}
    assert all(v >= 0 for v in parts.values()), parts
    assert math.isclose(sum(parts.values()), d["gmacs"], rel_tol=1e-9), (parts, d["gmacs"])
    assert math.isclose(parts["head"] * 1e9, spec.embed_dim * NUM_CLASSES, rel_tol=1e-9)  # one linear on CLS
    assert 0 < d["gmacs"] and d["unsupported_ops"] == []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_xfail(SPLIT_DEFECTS.get(n))) for n in NAMES])
def test_flop_split_is_the_same_with_both_counters(methods, tiny, name):
    _, spec = tiny
    budget = _reducing_budget(methods.get(name), spec)
    model, _, _, hw = random_model(name, TINY, TINY_SIZE, budget, num_classes=NUM_CLASSES)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    fv, tc = count_macs(model, x), count_macs(model, x, counter="torch")
    assert fv.macs == pytest.approx(tc.macs, rel=1e-9)
    assert fv.parts == pytest.approx(tc.parts, rel=1e-9), f"fvcore {fv.parts} vs torch {tc.parts}"


# -- 3. impossible budgets fail before any work ---------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
# budget_key -> (case id, value from the spec). The tiny spec: 4 x 6 = 24 patches of 8 px, 32 px high, 2 blocks.
BAD_BUDGETS: dict[str | None, list[tuple[str, Callable[[BackboneSpec], float]]]] = {
    "k": [("k=0", lambda s: 0), ("k=num_patches+1", lambda s: s.num_patches + 1), ("k=-1", lambda s: -1),
          ("k=2.5", lambda s: 2.5), ("k=nan", lambda s: NAN), ("k=inf", lambda s: INF)],
    # bipartite merging removes at most half the tokens of a block
    "r": [("r=-1", lambda s: -1), ("r=num_patches//2+1", lambda s: s.num_patches // 2 + 1),
          ("r=1.5", lambda s: 1.5), ("r=nan", lambda s: NAN), ("r=inf", lambda s: INF)],
    "keep_rate": [("keep_rate=0", lambda s: 0.0), ("keep_rate=-0.1", lambda s: -0.1), ("keep_rate=1.5", lambda s: 1.5),
                  ("keep_rate=nan", lambda s: NAN), ("keep_rate=inf", lambda s: INF),
                  ("keep_rate=-inf", lambda s: -INF)],
    "size": [("size=0", lambda s: 0), ("size=patch+1", lambda s: s.patch + 1),
             ("size=height+patch", lambda s: s.img_size[0] + s.patch), ("size=nan", lambda s: NAN),
             ("size=inf", lambda s: INF)],
    # a cosine-similarity threshold (algm): [-1, 1], 1 = nothing merged
    "threshold": [("threshold=1.5", lambda s: 1.5), ("threshold=-1.5", lambda s: -1.5),
                  ("threshold=nan", lambda s: NAN), ("threshold=inf", lambda s: INF)],
    # an entropy threshold in bits (apt): [0, log2(bins)] = [0, 9] at the default 512 bins, 0 = every patch at base size
    "entropy": [("entropy=-1", lambda s: -1.0), ("entropy=10", lambda s: 10.0), ("entropy=nan", lambda s: NAN),
                ("entropy=inf", lambda s: INF)],
    None: [("budget=8", lambda s: 8), ("budget=nan", lambda s: NAN)],  # no knob: any budget is impossible
}
BAD_CASES = [
    pytest.param(name, case, value, id=f"{name}-{case}", marks=_xfail(KNOWN_DEFECTS.get((name, case))))
    for name in NAMES
    for case, value in BAD_BUDGETS[_budget_key(name)]
]


@pytest.mark.parametrize("name,case,value", BAD_CASES)
def test_impossible_budget_fails_before_any_work(methods, tiny, monkeypatch, name, case, value):
    _, spec = tiny
    cls = methods.get(name)

    def no_build(self, vit):
        raise AssertionError(f"{name}: build() called for impossible budget {case}")

    monkeypatch.setattr(cls, "build", no_build)
    built: list[str] = []
    module_init = nn.Module.__init__

    def spy(self, *args, **kwargs):
        built.append(type(self).__name__)
        module_init(self, *args, **kwargs)

    nn.Module.__init__ = spy
    try:
        with pytest.raises((BudgetError, ConfigError)) as err:
            cls(spec, value(spec))
    finally:
        nn.Module.__init__ = module_init
    assert not built, f"{name}: modules built before the budget was refused: {built}"
    msg = str(err.value)
    assert msg and "\n" not in msg and name in msg, msg


# -- 4. metadata ---------------------------------------------------------------------------------------------
KINDS = ("baseline", "selection", "reduction")
BUDGET_KEYS = (None, "k", "r", "keep_rate", "size", "threshold", "entropy")
# Specs only (no weights are needed): the two backbones above and a 2 x 2 grid, the smallest a user can ask for
# with ``--img-size 32`` on a patch-16 ViT.
SPECS: dict[str, BackboneSpec] = {
    TINY: BackboneSpec(TINY, TINY_SIZE, patch=8, depth=2, embed_dim=32, num_heads=2, num_prefix=5),
    "vit_classic_p16": BackboneSpec("vit_base_patch16_224", (32, 48), patch=16, depth=2, embed_dim=32, num_heads=2,
                                    num_prefix=1),
    "grid_2x2_p16": BackboneSpec("vit_base_patch16_224", (32, 32), patch=16, depth=2, embed_dim=32, num_heads=2,
                                 num_prefix=1),
}
# (spec id, method) -> reason, for the default-budget contract (none known).
DEFAULT_BUDGET_DEFECTS: dict[tuple[str, str], str] = {}


def _spec_params(defects: dict[tuple[str, str], str] | None = None):
    return [pytest.param(sid, name, id=f"{sid}-{name}", marks=_xfail((defects or {}).get((sid, name))))
            for sid in SPECS for name in NAMES]


def test_spec_table_matches_the_backbones(backbone):
    vit, spec = backbone
    assert SPECS[TINY if spec.name == TINY else "vit_classic_p16"] == spec


@pytest.mark.parametrize("spec_id,name", _spec_params())
def test_metadata_and_budget_grid(methods, spec_id, name):
    spec = SPECS[spec_id]
    cls = methods.get(name)
    assert cls.name == name
    assert isinstance(cls.description, str) and cls.description.strip() and "\n" not in cls.description
    assert cls.kind in KINDS, cls.kind
    assert cls.training in typing.get_args(Training), cls.training
    assert cls.budget_key in BUDGET_KEYS, cls.budget_key
    grid = list(cls.budget_grid(spec))
    if cls.budget_key is None:
        assert grid == []
        return
    assert grid and grid == sorted(set(grid)), grid
    for b in grid:
        m = cls(spec, b)  # check_budget runs in __init__ and must accept the method's own grid
        assert resolve_budget(cls, m.budget_str()) == m.budget


@pytest.mark.parametrize("spec_id,name", _spec_params(DEFAULT_BUDGET_DEFECTS))
def test_default_budget_is_valid(methods, spec_id, name):
    """``cls(spec)`` (no ``--budget``) picks a budget that passes ``check_budget``, on any grid."""
    spec = SPECS[spec_id]
    cls = methods.get(name)
    default = cls.default_budget(spec)
    if cls.budget_key is None:
        assert default is None
    m = cls(spec)
    assert m.budget == (None if default is None else cls(spec, default).budget)


@pytest.mark.parametrize("spec_id,name", _spec_params())
def test_check_budget_only_checks(methods, spec_id, name, monkeypatch):
    """``check_budget`` validates and sets nothing: at every budget of the default grid (and the default budget) the
    method's ``__dict__`` is the same object for object after it as before. What ``build`` needs (pruning blocks,
    stages) is computed where it is needed, so a method is never half-configured by its validator."""
    spec = SPECS[spec_id]
    cls = methods.get(name)
    for budget in [*cls.budget_grid(spec), None]:
        with monkeypatch.context() as patched:  # the instance as __init__ leaves it, without check_budget's doing
            patched.setattr(cls, "check_budget", lambda self: None)
            m = cls(spec, budget)
        before = dict(m.__dict__)
        m.check_budget()
        after = m.__dict__
        assert after.keys() == before.keys(), f"{name} at {m.budget_str()}: check_budget set {set(after) - set(before)}"
        assert all(after[k] is v for k, v in before.items()), f"{name} at {m.budget_str()}: check_budget replaced " \
            f"{[k for k, v in before.items() if after[k] is not v]}"


def test_plugin_loads_from_its_file(methods):
    assert PLUGIN in methods.names()
    assert methods.get(PLUGIN).budget_key == PLUGIN_BUDGET_KEY


def test_plugin_origin_names_its_file(methods):
    assert methods.origin(PLUGIN).startswith(str(PLUGIN_PATH))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_under_bfloat16_autocast(methods, tiny, name):
    """``--autocast bfloat16`` is one flag for every method: each forward runs under it (train and eval mode, so
    the training paths of DynamicViT and ATS too), gives finite logits, and stays near the float32 ones."""
    from lwbench.precision import autocast

    vit, spec = tiny
    cls = methods.get(name)
    budget = _reducing_budget(cls, spec)
    torch.manual_seed(0)
    enc = cls(spec, None if budget is None else float(budget.split("=")[1])).build(vit)
    head = _heads(spec.embed_dim)["cls_token"]
    x = torch.randn(2, 3, *TINY_SIZE)
    for mode in (True, False):
        enc.train(mode)
        with torch.no_grad():
            torch.manual_seed(1)
            ref = _logits(head, enc(x), x.shape[-2:])
            torch.manual_seed(1)
            with autocast("cpu", "bfloat16"):
                got = _logits(head, enc(x), x.shape[-2:]).float()
        assert torch.isfinite(got).all(), name
        assert (got - ref).abs().max().item() < 0.25 * (1 + ref.abs().max().item()), (name, mode)
