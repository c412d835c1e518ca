"""How figures and listings present a method comes from its class, read through the registry: its plot style, its
no-op budget and whether it is training-free. No list in core code has to be kept in step with the methods."""

from __future__ import annotations

import pytest
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
