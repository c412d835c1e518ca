"""The Method interface: what a token-reduction or token-selection method must provide.

A method is a recipe, not a model: from a backbone *spec* it validates its budget before any
work starts; from the task-trained backbone it builds an encoder that returns a
:class:`~lwbench.tokens.TokenOutput`; if it needs training, ``fit`` produces the trained model
from a :class:`FitContext`. Class attributes are what ``lwbench list methods`` prints.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import nn

from lwbench.errors import BudgetError, ConfigError
from lwbench.labels import Labels, Training
from lwbench.options import NoOptions, build, to_dict
from lwbench.sizes import as_hw

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from lwbench.heads import TaskModel
    from lwbench.training.context import FitContext

AttentionMap = Literal["none", "cls", "full"]  # lwbench.labels.ATTENTION_MAPS

# A plugin's plot style (``Method.plot_style``): colours and markers no built-in method uses, picked by its name.
PLUGIN_COLORS = ("#8c6d31", "#7b4173", "#17a589", "#c49c94", "#5254a3", "#b5cf6b", "#e7969c", "#de9ed6", "#6b6ecf",
                 "#9c9ede", "#cedb9c", "#e7cb94")
PLUGIN_MARKERS = (">", "8", "o", "s", "D", "^", "v", "<")


def name_style(name: str) -> tuple[str, str]:
    """``(colour, marker)`` of a method that declares no ``style``, from its name alone: md5, not Python's salted
    ``hash()``, so it is the same in every process, and a figure of results whose method is not registered here (a
    plugin not loaded) draws it as a figure with the plugin loaded does."""
    h = int(hashlib.md5(name.encode()).hexdigest(), 16)
    return PLUGIN_COLORS[h % len(PLUGIN_COLORS)], PLUGIN_MARKERS[(h // 97) % len(PLUGIN_MARKERS)]


class classproperty:  # lower case, like the built-in ``property`` it extends
    """A read-only property of a class and its instances alike, for metadata derived from class attributes
    (``Method.training_free``), so ``METHODS.get(name).training_free`` needs no instance."""

    def __init__(self, fget: Any) -> None:
        self.fget = fget
        self.__doc__ = fget.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self.fget(owner if owner is not None else type(obj))


@dataclass(frozen=True)
class BackboneSpec:
    """What a method needs to know about its backbone to validate a budget, without weights."""

    name: str
    img_size: tuple[int, int]
    patch: int
    depth: int
    embed_dim: int
    num_heads: int
    num_prefix: int
    # "vit" | "vit-noclass" | "eva" | "eva-noclass" (lwbench.vit.FAMILIES), from the model's class, not its name
    family: str = "vit"

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch, self.img_size[1] // self.patch)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def of(cls, vit: VisionTransformer, name: str, img_size) -> BackboneSpec:
        from lwbench.vit import family_of

        h, w = as_hw(img_size)
        return cls(
            name=name,
            img_size=(int(h), int(w)),
            patch=int(vit.patch_embed.patch_size[0]),
            depth=len(vit.blocks),
            embed_dim=int(vit.embed_dim),
            num_heads=int(vit.blocks[0].attn.num_heads),
            num_prefix=int(vit.num_prefix_tokens),
            family=family_of(vit),
        )


class Overhead(nn.Module):
    """Marker base for submodules whose cost is selection overhead (selector, scorer, matcher).

    ``lwbench flops`` reports the MACs of every ``Overhead`` submodule on their own line, so a
    method's extra cost is never hidden inside "backbone". A module whose work is elementwise (a pixel statistic,
    no matrix products) sets ``counts_elementwise = True`` so that work is counted too, not reported as free
    (:mod:`lwbench.measure.flops`).
    """

    counts_elementwise: bool = False


class Method(abc.ABC):
    name: ClassVar[str] = "?"
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    budget_key: ClassVar[str | None] = None  # "k" | "r" | "keep_rate" | "size" | None (no knob)
    budget_type: ClassVar[type] = int
    default_budgets: ClassVar[tuple[float, ...]] = ()
    training: ClassVar[Training] = "none"
    # -- what the method needs (lwbench.labels: ``lwbench list methods``, the results tables, the report) ---------
    # Can serve a segmentation task through lwbench.tokens.densify (check_task refuses one when False).
    dense_output: ClassVar[bool] = True
    # The token count is set per image by the content (ATS, ALGM), not by the budget alone.
    variable_length: ClassVar[bool] = False
    # What the method reads of the backbone's attention probabilities at inference: "none" (tokens, keys, values or a
    # folded key bias: every block can run on a fused/flash kernel), "cls" (the CLS query's softmax row, EViT, ATS) or
    # "full" (the T x T map, MCTF); the last two are computed beside the fused kernel, which returns neither.
    attention_map: ClassVar[AttentionMap] = "none"
    kind: ClassVar[str] = "selection"  # "baseline" | "selection" (before backbone) | "reduction" (inside)
    # The method's options: a frozen dataclass of lwbench.options.option fields (default, help, range). Fields
    # typed lwbench.config.Stage are training stages; their unset values inherit the run's ``train`` section.
    Options: ClassVar[type] = NoOptions
    # Backbone families (lwbench.vit.FAMILIES) the algorithm works on; others are refused when the method is
    # constructed, in one line naming these. ``families_note`` says why (e.g. "it ranks tokens by CLS attention").
    families: ClassVar[tuple[str, ...]] = ("vit", "vit-noclass", "eva", "eva-noclass")
    families_note: ClassVar[str] = ""
    # True for a reference that reads the task's annotations at test time (``oracle``): a ceiling to read other
    # rows against, never an answer to "which method should I deploy" (``lwbench recommend`` leaves it out).
    reads_annotations: ClassVar[bool] = False
    # -- presentation: how figures and listings show the method ----------------------------------------------
    # ``(colour, marker)`` in every figure (matplotlib colour and marker). Not inherited: a subclass is another
    # method (a plugin's variant of ToMe) and must not be drawn as its parent; one that declares none gets
    # ``name_style`` (see ``plot_style``).
    style: ClassVar[tuple[str, str] | None] = None
    # Why no budget makes the method the plain backbone, when none does (``noop_budget`` is then the closest one).
    noop_note: ClassVar[str] = ""

    @classproperty
    def training_free(cls) -> bool:
        """Whether the method runs off the shelf on the task-trained backbone (``training == "none"``)."""
        return cls.training == "none"

    @classproperty
    def token_count(cls) -> str:
        """``"per image"`` for a content-adaptive method (``variable_length``), else ``"fixed"`` (by the budget)."""
        return "per image" if cls.variable_length else "fixed"

    @classproperty
    def labels(cls) -> Labels:
        """What the method needs (training, attention map, token count, dense output), read from the attributes
        above: :class:`lwbench.labels.Labels`."""
        return Labels.of(cls)

    @classmethod
    def plot_style(cls) -> tuple[str, str]:
        """``(colour, marker)`` of the method in every lwbench figure: its own ``style``, else one from its name."""
        own = cls.__dict__.get("style")
        return own if own is not None else name_style(cls.name)

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        """The budget at which the method is the plain backbone, bit for bit (k = all patches, r = 0, keep_rate = 1):
        the reference every reduction is measured from, checked for every registered method by the contract tests.
        ``None`` for a method without a budget knob (its only setting). A method whose every budget changes the model
        returns the closest one and says why in ``noop_note``; one with a knob must override this."""
        if cls.budget_key is None:
            return None
        raise NotImplementedError(f"method '{cls.name}' does not declare its no-op budget (Method.noop_budget)")

    def __init__(self, spec: BackboneSpec, budget: float | None = None, opts: Any = None, **kw: Any) -> None:
        self.spec = spec
        self.check_family()
        if budget is not None and self.budget_key is None:
            raise BudgetError(f"method '{self.name}' has no budget knob; drop the budget ({budget!r})")
        if budget is None and self.budget_key is not None:
            budget = self.default_budget(spec)
        self.budget = self.coerce_budget(budget)
        if opts is None or kw:
            opts = self.resolve_options({**(to_dict(opts) if opts is not None else {}), **kw})
        elif not isinstance(opts, self.Options):
            raise ConfigError(f"method '{self.name}': options must be {self.Options.__name__}, got "
                              f"{type(opts).__name__}")
        self.opts = opts
        # Facts a method learns while fitting that explain its result (LookWhere's where-target recall and
        # its warning); the runner copies them into the result row.
        self.diagnostics: dict[str, Any] = {}
        self.check_budget()

    def check_family(self) -> None:
        """Refuse a backbone family the algorithm cannot run on, in one line naming the supported ones."""
        fam = getattr(self.spec, "family", "vit")
        if fam in self.families:
            return
        from lwbench.vit import FAMILIES

        what = FAMILIES.get(fam, "unknown family")
        why = f" ({self.families_note})" if self.families_note else ""
        raise ConfigError(f"{self.name}: backbone {self.spec.name} is family '{fam}' ({what}); {self.name} supports "
                          f"families {', '.join(self.families)}{why}")

    # -- options --------------------------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, values: dict[str, Any] | None = None, train: Any = None) -> Any:
        """``cls.Options`` from a (nested) mapping, coerced and validated; with ``train`` (the run's
        :class:`lwbench.config.TrainConfig`) the stages' unset values are filled from it, so the stored config
        holds the numbers used. Without it they stay unset and ``FitContext`` fills them when training."""
        opts = build(cls.Options, values or {}, where="method")
        if train is None:
            return opts
        stages = {f: getattr(opts, f) for f in cls.stage_names(opts)}
        return dataclasses.replace(opts, **{k: v.resolved(train) for k, v in stages.items()}) if stages else opts

    @classmethod
    def stage_names(cls, opts: Any = None) -> list[str]:
        """The method's training stages (its ``Stage`` options), in declaration order."""
        from lwbench.config import Stage

        opts = opts if opts is not None else cls.Options()
        return [f.name for f in dataclasses.fields(cls.Options) if isinstance(getattr(opts, f.name), Stage)]

    def coerce_budget(self, budget: Any) -> float | int | None:
        """The budget as ``budget_type``; NaN, infinities and fractional ``k`` fail here, before any work."""
        if budget is None:
            return None
        try:
            value = float(budget)
        except (TypeError, ValueError):
            raise BudgetError(f"{self.name}: budget {budget!r} is not a number") from None
        if not math.isfinite(value):
            raise BudgetError(f"{self.name}: budget {self.budget_key}={budget} is not a finite number")
        if self.budget_type is int and not value.is_integer():
            raise BudgetError(f"{self.name}: budget {self.budget_key}={budget:g} must be a whole number")
        return self.budget_type(value)

    # -- to override ------------------------------------------------------------------------------

    @classmethod
    def default_budget(cls, spec: BackboneSpec) -> float | None:
        return cls.default_budgets[len(cls.default_budgets) // 2] if cls.default_budgets else None

    @classmethod
    def budget_grid(cls, spec: BackboneSpec) -> list[float]:
        """Budgets of the default sweep for this backbone (override when they depend on the grid)."""
        return list(cls.default_budgets)

    def check_budget(self) -> None:
        """Raise :class:`BudgetError` naming the valid range when the budget cannot be honoured."""
        return None

    def check_task(self, task: Any) -> None:
        """Raise :class:`ConfigError` in one line when the method cannot run on ``task`` (e.g. ``oracle`` needs
        object annotations). Called when a run is planned, before any teacher or training work. The default refuses a
        segmentation task when the method declares no dense output (``dense_output``); an override calls it."""
        if getattr(task, "kind", None) == "segmentation" and not self.dense_output:
            raise ConfigError(f"{self.name}: task '{getattr(task, 'name', '?')}' is a segmentation task and "
                              f"{self.name} declares no dense output (Method.dense_output = False)")

    @abc.abstractmethod
    def build(self, vit: VisionTransformer) -> nn.Module:
        """An encoder ``x -> TokenOutput`` around (a copy of) the task-trained ``vit``.

        Must not modify ``vit``: every method starts from the same task-trained backbone."""

    def fit(self, ctx: FitContext) -> nn.Module:
        """Train what the method needs and return the trained ``TaskModel``. Resumable through ``ctx``.

        The default (training-free methods) wraps the task-trained backbone and reuses its head; in the
        ``finetuned`` regime (``ctx.regime``) it then fine-tunes encoder and head with the task loss and the
        run's ``train`` recipe at this budget, the same steps every other method of the comparison gets."""
        if ctx.regime == "finetuned":
            return ctx.finetune(self.task_model(ctx, trainable=True), tag=f"{self.name}-{self.budget_str()}-finetune")
        return self.task_model(ctx)

    def finetuned_once(self, ctx: FitContext, tag: str) -> nn.Module:
        """The task model at this budget fine-tuned once with the method's ``finetune`` stage (which inherits
        the run's ``train.*`` recipe), or untrained when that stage has no steps: the ``fit`` of a method whose
        only training is fine-tuning (random, grid, lowres)."""
        stage = self.opts.finetune
        if not ctx.stage(stage).steps:
            return self.task_model(ctx)
        model = self.task_model(ctx, trainable=True)
        ctx.finetune(model, tag=tag, stage=stage)
        return model.eval()

    def finetune_stage(self) -> Any:
        """The stage whose steps count as task fine-tuning in the row (``finetune_steps``): the ``finetune``
        option when the method has one; other stages (LookWhere's distillation) count as pretraining."""
        return getattr(self.opts, "finetune", None)

    def task_model(self, ctx: FitContext, trainable: bool = False) -> TaskModel:
        """This method's encoder on the teacher's backbone, with a trainable copy of the teacher's head.

        ``trainable`` also unfreezes every encoder parameter, for methods that fine-tune all of it: copies
        of the frozen teacher inherit its ``requires_grad=False``."""
        from lwbench.heads import TaskModel

        model = TaskModel(self.build(ctx.teacher.encoder.vit), copy.deepcopy(ctx.teacher.head).requires_grad_(True))
        return model.requires_grad_(True) if trainable else model

    # -- helpers ---------------------------------------------------------------------------------
    def budget_str(self) -> str:
        if self.budget_key is None:
            return "-"
        b = self.budget
        return f"{self.budget_key}={b:g}" if isinstance(b, float) else f"{self.budget_key}={b}"

    def resolved_options(self) -> dict[str, Any]:
        """The options as they will be used (auto values resolved), for the stored config; override to add
        what ``auto`` became (LookWhere's selector size)."""
        return to_dict(self.opts)

    def _require(self, ok: bool, valid: str) -> None:
        if not ok:
            raise BudgetError(
                f"{self.name}: budget {self.budget_str()} is impossible for {self.spec.name} at "
                f"{self.spec.img_size[0]}x{self.spec.img_size[1]} (grid {self.spec.grid[0]}x{self.spec.grid[1]} = "
                f"{self.spec.num_patches} patches); valid: {valid}"
            )


class PatchSelectionMethod(Method):
    """Base for methods that pick ``k`` high-res patches before the backbone (random, DPS, IPS, LookWhere).

    They share the budget's meaning, its valid range (1..grid cells) and a default grid at fixed fractions
    of the patch grid, so a sweep compares them at the same k."""

    kind: ClassVar[str] = "selection"
    budget_key: ClassVar[str | None] = "k"
    grid_fractions: ClassVar[tuple[float, ...]] = (1 / 16, 1 / 8, 1 / 4)

    @classmethod
    def default_budget(cls, spec: BackboneSpec) -> float | None:
        grid = cls.budget_grid(spec)
        return grid[min(1, len(grid) - 1)]  # the middle of three; tiny grids may have fewer distinct values

    @classmethod
    def budget_grid(cls, spec: BackboneSpec) -> list[float]:
        n = spec.num_patches
        return sorted({max(1, round(n * f)) for f in cls.grid_fractions})

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return spec.num_patches  # every patch, in grid order

    def check_budget(self) -> None:
        n = self.spec.num_patches
        self._require(1 <= self.budget <= n, f"k=1..{n}")


def parse_budget(text: str | None) -> tuple[str | None, float | None]:
    """``"k=64"`` -> ``("k", 64.0)``; ``None`` -> ``(None, None)``."""
    if text is None or text == "-":
        return None, None
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"budget '{text}' must look like key=value, e.g. k=64 or r=8")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise ConfigError(f"budget value in '{text}' is not a number") from None


def resolve_budget(method_cls: type[Method], text: str | None) -> float | None:
    key, value = parse_budget(text)
    if key is None:
        return None
    if method_cls.budget_key is None:
        raise BudgetError(f"method '{method_cls.name}' has no budget knob; drop --budget")
    if key != method_cls.budget_key:
        raise BudgetError(f"method '{method_cls.name}' takes budget {method_cls.budget_key}=..., not {key}=...")
    return value


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def detach_copy(vit: nn.Module) -> nn.Module:
    """A deep copy that shares nothing with the (frozen) task-trained backbone, trainable again."""
    return copy.deepcopy(vit).requires_grad_(True)


__all__ = ["BackboneSpec", "Method", "Overhead", "PatchSelectionMethod", "parse_budget", "resolve_budget", "freeze",
           "detach_copy", "name_style", "classproperty"]
