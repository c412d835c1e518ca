"""Rows that must not be read as one comparison: different test sets, teachers or fine-tuning recipes, and fine-tuned
methods beside an off-the-shelf-only ``full``.

A results folder can hold rows that share method, budget and regime but answer different questions: a Python
example evaluated on 64 images with a 50-step teacher beside a sweep evaluated on 1000 images with a 2000-step one.
Replicate **seeds** of one config may be averaged (that is what ``replicate_id`` is for); these differences may not.
:func:`differences` finds them in a frame and names each row's side; tables add a column and a note, plots split
the lines (``full (off the shelf, 64 eval images)``), keep the frontier to the main side and say so, and the note
gives the ``--where`` that selects one side (:mod:`lwbench.row_filter`).

The main side of a difference is the one most rows are on (ties: the larger test set, the longer-trained teacher);
labels name only the other sides, so the usual case, one setting, reads as before.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lwbench.schema import finite_float, flatten

if TYPE_CHECKING:
    import pandas as pd

# The recipe's parts (``finetune_recipe``: "steps=100 lr=0.0005 batch=32 warmup=10") and the config keys they come
# from, for a --where that selects one recipe and keeps the off-the-shelf rows (which carry the profile's train.*).
RECIPE_KEYS = {"steps": "train.steps", "lr": "train.lr", "batch": "train.batch_size", "warmup": "train.warmup_steps"}
# The teacher's settings a frame without its config still has, and how a label names each.
_TEACHER_COLUMNS = {"teacher_steps": "teacher {} steps", "teacher_probe_steps": "probe {} steps", "init": "init {}"}
# The config sections a teacher depends on besides the seed (lwbench.runner: teacher_id).
_TEACHER_CONFIG = ("teacher.", "head.", "data.", "weights_sha256", "task_opts.", "task_version")


@dataclass(frozen=True)
class Difference:
    """One way the rows of a comparison differ.

    ``what`` names it (``eval size``, ``teacher``, ``fine-tuning recipe``); ``sides`` are ``(label, rows)`` with the
    main side first; ``labels`` is each row's side label (position in the frame -> ``"64 eval images"``, ``""`` on
    the main side and for rows it does not concern); ``column`` a table header; ``cells`` each row's value for that
    column; ``where`` the ``--where`` that selects the main side."""

    what: str
    column: str
    sides: tuple[tuple[str, int], ...]
    labels: tuple[str, ...]
    cells: tuple[str, ...]
    where: str

    def line(self) -> str:
        """One line for the terminal, a table's notes and a figure: what differs, that it is kept apart, how to
        select one side."""
        counts = ", ".join(f"{n} row{'s' if n != 1 else ''} {'with' if self.what == 'teacher' else 'on'} {label}"
                           for label, n in self.sides)
        return f"rows differ in {self.what}: {counts}; never averaged, kept apart; select one with {self.where}"


_finite = finite_float  # one definition: lwbench.schema.finite_float


def _int_text(v: Any) -> str:
    x = _finite(v)
    return str(int(x)) if x is not None and x.is_integer() else str(v)


def _main(counter: Counter, order: Any) -> Any:
    """The value most rows have; ties broken by ``order`` (largest first)."""
    return max(counter, key=lambda k: (counter[k], order(k)))


def _eval_size(d: pd.DataFrame) -> Difference | None:
    if "n_eval" not in d.columns:
        return None
    sizes = [int(x) if (x := _finite(v)) is not None else None for v in d["n_eval"]]
    counts = Counter(s for s in sizes if s is not None)
    if len(counts) < 2:
        return None
    main = _main(counts, lambda s: s)
    sides = [(f"{s} eval images", counts[s]) for s in sorted(counts, key=lambda s: (s != main, -s))]
    labels = tuple("" if s is None or s == main else f"{s} eval images" for s in sizes)
    cells = tuple("-" if s is None else str(s) for s in sizes)
    return Difference("test set size", "n_eval", tuple(sides), labels, cells, f"--where n_eval={main}")


def _teacher_settings(d: pd.DataFrame) -> list[dict[str, Any]]:
    """Each row's teacher settings without the seed: the teacher columns, and the config sections it depends on when
    the frame holds the config."""
    has_config = "config" in d.columns
    out = []
    for _, r in d.iterrows():
        s = {c: _int_text(r.get(c)) for c in _TEACHER_COLUMNS if c in d.columns}
        if has_config:
            flat = flatten(r.get("config") or {})
            s.update({k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()
                      if k.startswith(_TEACHER_CONFIG) and not k.startswith("data.root")})
        out.append(s)
    return out


def _teacher(d: pd.DataFrame) -> Difference | None:
    if "teacher_id" not in d.columns:
        return None
    ids = [v if isinstance(v, str) and v else None for v in d["teacher_id"]]
    if len({i for i in ids if i}) < 2:
        return None
    settings = _teacher_settings(d)
    keys = [json.dumps(s, sort_keys=True) for s in settings]
    seeds = list(d["seed"]) if "seed" in d.columns else [None] * len(d)
    # Seed replicates train their teachers with their own seeds: other ids, same settings, one side. Two ids on one
    # seed with the same visible settings differ in something the frame does not show: each is its own side.
    per: dict[tuple, set] = {}
    for i, (k, s) in enumerate(zip(keys, seeds, strict=True)):
        if ids[i]:
            per.setdefault((k, str(s)), set()).add(ids[i])
    keys = [f"id {ids[i]}" if ids[i] and len(per[(k, str(s))]) > 1 else k
            for i, (k, s) in enumerate(zip(keys, seeds, strict=True))]
    counts = Counter(k for k, i in zip(keys, ids, strict=True) if i)
    if len(counts) < 2:
        return None
    by_key = {k: settings[keys.index(k)] for k in counts}
    named = [k for k in counts if not k.startswith("id ")]
    varying = sorted((c for c in {c for s in by_key.values() for c in s} if len({by_key[k].get(c) for k in named}) > 1),
                     key=lambda c: (c not in _TEACHER_COLUMNS, c))
    # A setting that splits the teachers exactly as an earlier one does adds nothing (teacher.steps = teacher_steps).
    seen: list[tuple] = []
    for c in list(varying):
        split = tuple(sorted(tuple(sorted(k for k in named if by_key[k].get(c) == v))
                             for v in {by_key[k].get(c) for k in named}))
        if split in seen:
            varying.remove(c)
        else:
            seen.append(split)

    def name(k: str) -> str:
        if k.startswith("id "):
            return f"teacher {k[3:11]}"
        s = by_key[k]
        bits = [(_TEACHER_COLUMNS[c].format(s.get(c)) if c in _TEACHER_COLUMNS else f"{c}={s.get(c)}")
                for c in varying[:2]]
        return ", ".join(bits) or "teacher ?"

    def steps(k: str) -> float:
        return _finite(by_key[k].get("teacher_steps")) or 0.0

    main = _main(counts, steps)
    sides = [(name(main), counts[main])] + [(name(k), counts[k]) for k in counts if k != main]
    labels = tuple("" if i is None or k == main else name(k) for k, i in zip(keys, ids, strict=True))
    cells = tuple("-" if i is None else name(k).removeprefix("teacher ") for k, i in zip(keys, ids, strict=True))
    if main.startswith("id "):
        where = f"--where teacher_id={main[3:]}"
    elif varying and varying[0] in _TEACHER_COLUMNS:
        where = f"--where {varying[0]}={by_key[main].get(varying[0])}"
    elif varying:
        where = f"--where {varying[0]}={json.loads(by_key[main][varying[0]])}"
    else:
        where = f"--where teacher_id={next(i for k, i in zip(keys, ids, strict=True) if k == main)}"
    return Difference("teacher", "teacher", tuple(sides), labels, cells, where)


def parse_recipe(text: Any) -> dict[str, str]:
    """``"steps=100 lr=0.0005 batch=32 warmup=10"`` -> ``{"steps": "100", ...}``; ``{}`` for ``-`` or no text."""
    if not isinstance(text, str):
        return {}
    return dict(p.split("=", 1) for p in text.split() if "=" in p)


def _recipe(d: pd.DataFrame) -> Difference | None:
    if "finetune_recipe" not in d.columns:
        return None
    tuned = [isinstance(r, str) and r not in ("", "-") and (reg != "off_the_shelf")
             for r, reg in zip(d["finetune_recipe"], d["regime"] if "regime" in d.columns else [None] * len(d),
                               strict=True)]
    recipes = [parse_recipe(r) if t else None for r, t in zip(d["finetune_recipe"], tuned, strict=True)]
    counts = Counter(json.dumps(r, sort_keys=True) for r in recipes if r is not None)
    if len(counts) < 2:
        return None
    parsed = {k: json.loads(k) for k in counts}
    varying = sorted({p for r in parsed.values() for p in r if len({r2.get(p) for r2 in parsed.values()}) > 1},
                     key=lambda p: (list(RECIPE_KEYS).index(p) if p in RECIPE_KEYS else 9, p))

    def name(k: str) -> str:
        return "ft " + " ".join(f"{p}={parsed[k].get(p, '?')}" for p in varying)

    main = _main(counts, lambda k: _finite(parsed[k].get("steps")) or 0.0)
    sides = [(name(main), counts[main])] + [(name(k), counts[k]) for k in counts if k != main]
    keys = [json.dumps(r, sort_keys=True) if r is not None else None for r in recipes]
    labels = tuple("" if k is None or k == main else name(k) for k in keys)
    cells = tuple("-" if k is None else name(k).removeprefix("ft ") for k in keys)
    part = varying[0] if varying else "steps"
    key = RECIPE_KEYS.get(part, f"train.{part}")
    where = f"--where {key}={parsed[main].get(part)}"
    return Difference("fine-tuning recipe", "recipe", tuple(sides), labels, cells, where)


def differences(d: pd.DataFrame) -> list[Difference]:
    """The ways the rows of ``d`` (one comparison: a table block, a figure) differ that forbid averaging them or
    reading them as one comparison: test set size, teacher settings, fine-tuning recipe. Empty when they agree."""
    if d is None or len(d) < 2:
        return []
    d = d.reset_index(drop=True)
    return [x for x in (_eval_size(d), _teacher(d), _recipe(d)) if x is not None]


def side_labels(diffs: list[Difference], n: int) -> list[str]:
    """Each of ``n`` rows' label of the sides it is not on the main side of (``"64 eval images, teacher 50
    steps"``), ``""`` for rows on every main side."""
    return [", ".join(x.labels[i] for x in diffs if x.labels[i]) for i in range(n)]


def regime_mismatch(d: pd.DataFrame, reference: str = "full") -> str:
    """One line when methods were fine-tuned but ``reference`` only ran off the shelf (they got training it did
    not), or the reverse; ``""`` when every regime a method ran in has a ``reference`` row."""
    if "regime" not in d.columns or "method" not in d.columns:
        return ""
    ref = set(d.loc[d["method"] == reference, "regime"].dropna())
    if not ref:
        return ""
    bits = []
    for regime, other in (("finetuned", "off the shelf"), ("off_the_shelf", "fine-tuned")):
        if regime in ref:
            continue
        methods = sorted(set(d.loc[(d["method"] != reference) & (d["regime"] == regime), "method"]))
        if methods:
            name = regime.replace("_", " ").replace("finetuned", "fine-tuned")
            shown = ", ".join(methods[:4]) + (f" and {len(methods) - 4} more" if len(methods) > 4 else "")
            bits.append(f"{shown} {'is' if len(methods) == 1 else 'are'} {name} but `{reference}` only {other}")
    if not bits:
        return ""
    missing = "finetuned" if "finetuned" not in ref else "off_the_shelf"
    have = sorted(ref)[0]
    return (f"regimes differ: {'; '.join(bits)}, so the comparison is not like for like; run `{reference}` "
            f"{missing.replace('_', ' ')} too (lwbench run --method {reference} --regime {missing} ...) or "
            f"select one with --where regime={have}")


__all__ = ["Difference", "differences", "side_labels", "regime_mismatch", "parse_recipe", "RECIPE_KEYS"]
