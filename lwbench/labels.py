"""What a method needs, as four labels read from its class, for ``lwbench list methods``, the results tables and
the report.

Each label is declared once, as a class attribute of the method (its default on :class:`lwbench.method.Method`,
overridden in a method's class only where it differs, and inherited by subclasses and plugins):

* **training** (``Method.training``): ``"none"`` is training-free (``Method.training_free``, what
  ``--regime off_the_shelf`` runs), anything else is trained (``finetune``, ``pretrain+finetune``);
* **attention map** (``Method.attention_map``): what the method reads of the backbone's attention probabilities at
  inference. ``"none"``: nothing (tokens, keys, values, or a per-key bias folded into the dot product), so every
  block can run on a fused (flash) kernel, which returns no probabilities. ``"cls"``: the CLS query's softmax row
  over the keys (EViT, ATS); ``"full"``: every row, the ``T x T`` map (MCTF's attention each token receives). A
  fused kernel does not give either, so they are computed beside it (lwbench recomputes them from q and k: ``O(T)``
  per head for a row, ``O(T^2)`` for the map);
* **token count** (``Method.variable_length``): ``"fixed"`` when the budget alone (and the image size) sets how many
  tokens each block sees, ``"per image"`` when the content does (ATS, ALGM: batches are padded);
* **dense output** (``Method.dense_output``): the method can serve a segmentation task (ADE20K) through
  :func:`lwbench.tokens.densify`; ``Method.check_task`` refuses a segmentation task otherwise.

Nothing here imports torch; :func:`method_labels` imports the method's module through the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: What a method trains (``Method.training``): ``none`` is training-free.
Training = Literal["none", "finetune", "pretrain+finetune"]
ATTENTION_MAPS = ("none", "cls", "full")
TOKEN_COUNTS = ("fixed", "per image")

# The words of ``lwbench list methods`` and the report's methods table.
_ATTENTION_WORDS = {"none": "no", "cls": "CLS row", "full": "full map"}
# One character per label for the results tables' ``labels`` column (LEGEND says what each means).
_ATTENTION_CODES = {"none": "-", "cls": "c", "full": "A"}
LEGEND = ("labels: F training-free, T trained | attention map read: - none, c CLS row, A all rows | tokens: f fixed "
          "per budget, v per image | d dense output (segmentation), - none")
UNKNOWN_CODE = "?"  # a method the registry does not know here (a plugin not loaded) or cannot import


@dataclass(frozen=True)
class Labels:
    """A method's four labels, as its class declares them (:meth:`of`)."""

    training: str  # Method.training: "none" | "finetune" | "pretrain+finetune"
    attention_map: str  # one of ATTENTION_MAPS
    token_count: str  # one of TOKEN_COUNTS
    dense: bool

    @classmethod
    def of(cls, method: Any) -> Labels:
        """The labels of a method class (or instance)."""
        return cls(training=method.training, attention_map=method.attention_map,
                   token_count="per image" if method.variable_length else "fixed", dense=bool(method.dense_output))

    @property
    def training_free(self) -> bool:
        return self.training == "none"

    def problems(self) -> list[str]:
        """What is not an allowed value (empty when all are)."""
        from typing import get_args

        out = []
        if self.training not in get_args(Training):
            out.append(f"training {self.training!r} is not one of {', '.join(get_args(Training))}")
        if self.attention_map not in ATTENTION_MAPS:
            out.append(f"attention_map {self.attention_map!r} is not one of {', '.join(ATTENTION_MAPS)}")
        return out

    def words(self) -> dict[str, str]:
        """``{header: cell}`` for ``lwbench list methods``: training, attn map, tokens, dense."""
        return {"training": "training-free" if self.training_free else self.training,
                "attn map": _ATTENTION_WORDS.get(self.attention_map, str(self.attention_map)),
                "tokens": self.token_count, "dense": "yes" if self.dense else "no"}

    def code(self) -> str:
        """Four characters, one per label, for the results tables (:data:`LEGEND`): ``F-fd`` is ToMe."""
        return ("F" if self.training_free else "T") + _ATTENTION_CODES.get(self.attention_map, UNKNOWN_CODE) + \
            ("v" if self.token_count == "per image" else "f") + ("d" if self.dense else "-")


def method_labels(name: str) -> Labels | None:
    """The labels of the registered method ``name``; None for a name the registry does not know (rows of a plugin
    not loaded in this process) or a plugin that fails to import, so a table of stored rows still prints."""
    from lwbench.registry import METHODS

    try:
        return Labels.of(METHODS.get(name))
    except Exception:  # unknown name, broken plugin: the table prints "?" instead
        return None


def label_code(name: str) -> str:
    """:meth:`Labels.code` of the registered method ``name``, :data:`UNKNOWN_CODE` when it cannot be read."""
    labels = method_labels(name)
    return labels.code() if labels is not None else UNKNOWN_CODE


__all__ = ["ATTENTION_MAPS", "TOKEN_COUNTS", "LEGEND", "UNKNOWN_CODE", "Labels", "method_labels", "label_code"]
