"""How figures and listings present a method comes from its class, read through the registry: its plot style, its
no-op budget, whether it is training-free and what it needs (its labels: training, attention map, token count, dense
output, :mod:`lwbench.labels`). No list in core code has to be kept in step with the methods."""

from __future__ import annotations

import pytest
import torch
from _toy import make

from lwbench.method import Method, name_style
from lwbench.plots import method_style
from lwbench.registry import METHODS, training_free_methods

NAMES = METHODS.names()


@pytest.mark.parametrize("name", NAMES)
def test_training_free_is_derived_from_training(name):
    cls = METHODS.get(name)
    assert cls.training_free is (cls.training == "none")
    assert cls(make("lw_vit_test_p8", (32, 48))[1]).training_free is cls.training_free  # on instances too


def test_training_free_list_is_read_from_the_registry():
    free = training_free_methods()  # plugins that other tests loaded (--plugin) are registered too: read them now
    assert free == [n for n in METHODS.names() if METHODS.get(n).training == "none"]
    # the methods a hand-kept list once missed
    assert {"full", "tome", "pitome", "mctf", "algm", "repshift"} <= set(free)
    assert not {"lookwhere", "dynamicvit", "dtem"} & set(free)


@pytest.mark.parametrize("name", NAMES)
def test_every_builtin_declares_its_own_style(name):
    cls = METHODS.get(name)
    assert cls.__dict__.get("style") is not None, f"{name}: declare Method.style (colour, marker)"
    assert method_style(name) == cls.plot_style() == cls.style


def test_style_is_not_inherited_and_unknown_names_match_registered_plugins():
    """A subclass is another method: a plugin built on ToMe is not drawn as ToMe. A plugin without a style is drawn
    in a pick from its name, the same whether or not the plugin is loaded when the figure is made."""
    tome = METHODS.get("tome")
    variant = type("MyToMe", (tome,), {"name": "my_tome_variant"})
    assert variant.plot_style() == name_style("my_tome_variant") != tome.style
    assert method_style("my_tome_variant") == variant.plot_style()  # not registered: the same pick
    assert Method.__dict__["style"] is None


def test_noop_budget_is_none_only_without_a_budget_knob():
    spec = make("lw_vit_test_p8", (32, 48))[1]
    assert METHODS.get("full").noop_budget(spec) is None
    bare = type("NoNoop", (Method,), {"name": "no_noop", "budget_key": "r", "build": lambda self, vit: vit})
    with pytest.raises(NotImplementedError, match="no_noop"):
        bare.noop_budget(spec)


# -- what a method needs: training, attention map, token count, dense output (lwbench.labels) ---------------------
# Known answers, read off each method's file: (training, attention map, token count, dense output).
KNOWN_LABELS = {
    "tome": ("none", "none", "fixed", True),  # keys; proportional attention folded into the dot product (flash)
    "pitome": ("none", "none", "fixed", True),  # energy on the keys
    "dtem": ("pretrain+finetune", "none", "fixed", True),  # a learned embedding in place of the keys
    "mctf": ("none", "full", "fixed", True),  # the attention every token receives: every query row
    "evit": ("none", "cls", "fixed", True),  # ranks and fuses by the CLS row
    "topk": ("none", "cls", "fixed", True),
    "evit_random": ("none", "cls", "fixed", True),  # random ranks, but fuses the rest by their CLS attention
    "topk_random": ("none", "none", "fixed", True),  # random ranks, nothing fused
    "ats": ("none", "cls", "per image", True),  # CLS row x value norm, inverse-transform sampling
    "algm": ("none", "none", "per image", True),  # token similarity above a threshold
    "repshift": ("none", "none", "fixed", True),  # ||MLP(LN(x)) - x||
    "dynamicvit": ("finetune", "none", "fixed", True),  # MLP predictors, top floor(rho^s N) at inference
    "ips": ("finetune", "none", "fixed", True),  # its own aggregator's attention, not the backbone's
    "dps": ("finetune", "none", "fixed", True),  # a CNN scorer
    "lookwhere": ("pretrain+finetune", "none", "fixed", True),  # the teacher's attention only while distilling
    "saliency": ("none", "none", "fixed", True),
    "oracle": ("none", "none", "fixed", True),
    "random": ("finetune", "none", "fixed", True),
    "grid": ("finetune", "none", "fixed", True),
    "lowres": ("finetune", "none", "fixed", True),
    "full": ("none", "none", "fixed", True),
}


@pytest.mark.parametrize("name", NAMES)
def test_every_method_labels_are_allowed_values(name):
    from lwbench.labels import ATTENTION_MAPS, TOKEN_COUNTS, Labels

    cls = METHODS.get(name)
    labels = cls.labels
    assert labels == Labels.of(cls) == cls(make("lw_vit_test_p8", (32, 48))[1]).labels  # on instances too
    assert labels.problems() == [], f"{name}: {labels.problems()}"
    assert labels.attention_map in ATTENTION_MAPS and labels.token_count in TOKEN_COUNTS
    assert isinstance(cls.dense_output, bool) and isinstance(cls.variable_length, bool), name
    assert labels.training_free is cls.training_free and cls.token_count == labels.token_count
    code = labels.code()
    assert len(code) == 4 and "?" not in code, code


@pytest.mark.parametrize("name", sorted(KNOWN_LABELS))
def test_known_labels(name):
    labels = METHODS.get(name).labels
    assert (labels.training, labels.attention_map, labels.token_count, labels.dense) == KNOWN_LABELS[name]


def test_labels_words_and_codes():
    from lwbench.labels import label_code

    assert METHODS.get("evit").labels.words() == {"training": "training-free", "attn map": "CLS row",
                                                 "tokens": "fixed", "dense": "yes"}
    assert METHODS.get("ats").labels.words()["tokens"] == "per image"
    assert METHODS.get("lookwhere").labels.words()["training"] == "pretrain+finetune"
    assert [label_code(n) for n in ("tome", "evit", "ats", "mctf", "lookwhere")] == \
        ["F-fd", "Fcfd", "Fcvd", "FAfd", "T-fd"]
    assert label_code("not_a_registered_method") == "?"


def test_plugin_gets_defaults_inherits_and_declares_its_own():
    """A plugin declaring nothing is training-free, reads no attention map, has a fixed token count and dense
    output; a subclass inherits what its parent declares (unlike ``style``); any class can declare its own."""
    bare = type("Bare", (Method,), {"name": "bare", "build": lambda self, vit: vit})
    assert (bare.labels.training, bare.labels.attention_map, bare.labels.token_count, bare.labels.dense) == \
        ("none", "none", "fixed", True)
    evit = METHODS.get("evit")
    assert type("MyEViT", (evit,), {"name": "my_evit"}).labels == evit.labels
    own = type("Own", (evit,), {"name": "own", "attention_map": "full", "variable_length": True,
                                "dense_output": False, "training": "finetune"})
    assert own.labels.code() == "TAv-" and own.token_count == "per image"


def test_segmentation_is_refused_without_dense_output():
    from types import SimpleNamespace

    from lwbench.errors import ConfigError

    spec = make("lw_vit_test_p8", (32, 48))[1]
    flat = type("Flat", (Method,), {"name": "flat", "dense_output": False, "build": lambda self, vit: vit})(spec)
    seg = SimpleNamespace(kind="segmentation", name="ade20k")
    with pytest.raises(ConfigError, match="flat: task 'ade20k' is a segmentation task.*no dense output"):
        flat.check_task(seg)
    flat.check_task(SimpleNamespace(kind="classification", name="cub"))  # classification is fine
    METHODS.get("tome")(spec).check_task(seg)  # a dense method takes it


def _reducing_budget(cls, spec):
    """The middle of the method's default grid (a budget that reduces), None without a budget knob."""
    grid = cls.budget_grid(spec) if cls.budget_key else []
    return grid[len(grid) // 2] if grid else None


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_labels_hold_at_a_reducing_budget(name):
    """What the labels promise, on the tiny backbone at a budget that reduces: dense output densifies onto the patch
    grid and a segmentation head reads it; a fixed token count is the same for every image and every batch."""
    from lwbench.heads import LinearSegHead
    from lwbench.tokens import densify

    vit, spec = make("lw_vit_test_p8", (32, 48))
    cls = METHODS.get(name)
    enc = cls(spec, _reducing_budget(cls, spec)).build(vit).eval()
    gen = torch.Generator().manual_seed(0)
    outs = [enc(torch.randn(3, 3, *spec.img_size, generator=gen)) for _ in range(2)]
    if cls.dense_output:
        out = outs[0]
        dense = densify(out)
        assert dense.shape == (3, out.grid[0] * out.grid[1], spec.embed_dim) and torch.isfinite(dense).all()
        seg = LinearSegHead(spec.embed_dim, 5).eval()(out, size=spec.img_size)
        assert seg.shape == (3, 5, *spec.img_size)
    if not cls.variable_length:
        counts = torch.cat([o.realised_tokens() for o in outs])
        assert bool((counts == counts[0]).all()), f"{name}: token counts {counts.tolist()} vary ('fixed' label)"


def test_report_methods_table_reads_the_labels():
    from lwbench.report import methods_table

    lines = methods_table(["ats", "lookwhere", "not_loaded_plugin"]).splitlines()
    assert lines[0] == "| method | training | attn map | tokens | dense |"
    assert lines[2:] == ["| `ats` | training-free | CLS row | per image | yes |",
                         "| `lookwhere` | pretrain+finetune | no | fixed | yes |",
                         "| `not_loaded_plugin` | ? | ? | ? | ? |"]
