"""Teachers lwbench ships: the quick profile's task-trained backbones, produced by lwbench itself, so that a
newcomer's first ``lwbench run`` does not spend 20+ minutes of CPU on a teacher before the first number.

A shipped teacher is the exact cache folder ``teachers/<teacher_id>`` that the documented command wrote
(weights, ``state.json``/``done.json`` with the time it took, the config it hashes), plus ``shipped.json``: the
command that reproduces it, the platform it was trained on, the sha256 of its weights and how far a retraining
was checked against it. It is used only when its ``teacher_id`` (the hash of everything the teacher depends
on: backbone, task and data version, head, teacher recipe, seed) equals the run's, so any change of config
trains afresh as before. ``--retrain-teacher`` trains afresh even then; rows say which happened
(``teacher_source``: ``shipped`` or ``trained``). ``benchmarks/shipped_teachers.py`` writes and checks them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from lwbench.backbones import file_sha256 as sha256  # the hash weights enter run ids by: one definition
from lwbench.paths import temp_beside

log = logging.getLogger("lwbench")

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_teachers"
MARKER = "shipped.json"
FILES = ("model.safetensors", "state.json", "config.json", "done.json")  # done.json last: it marks completion


def shipped_folder(teacher_id: str) -> Path | None:
    """The shipped copy of ``teacher_id``, or None (not shipped, or incomplete)."""
    folder = SHIPPED_DIR / teacher_id
    return folder if all((folder / f).is_file() for f in (*FILES, MARKER)) else None


def is_shipped_copy(tdir: Path) -> bool:
    return (Path(tdir) / MARKER).is_file()


def install(teacher_id: str, tdir: Path) -> bool:
    """Copy the shipped teacher ``teacher_id`` into the cache folder ``tdir`` (each file atomically, ``done.json``
    last, so a killed copy is an unfinished teacher, never a damaged one) after checking its weights' sha256.
    False when nothing is shipped for this id."""
    src = shipped_folder(teacher_id)
    if src is None:
        return False
    meta = json.loads((src / MARKER).read_text())
    if sha256(src / "model.safetensors") != meta.get("weights_sha256"):
        log.warning("shipped teacher %s: its weights do not match the sha256 in %s (damaged install?); training "
                    "it instead", teacher_id, src / MARKER)
        return False
    tdir = Path(tdir)
    tdir.mkdir(parents=True, exist_ok=True)
    for name in (MARKER, *FILES):
        tmp = temp_beside(tdir, name)
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, tdir / name)
    log.info("teacher %s: using the copy lwbench ships (trained by `%s` in %.0f s on %s; %s); "
             "--retrain-teacher trains it afresh", teacher_id, meta.get("command", "?"),
             float(meta.get("train_seconds", 0)), meta.get("trained_on", "?"), meta.get("reproducibility", ""))
    return True


def forget_shipped(tdir: Path) -> None:
    """Before retraining over a shipped copy: remove its files and every stage built on it (``methods/``)."""
    tdir = Path(tdir)
    for name in ("done.json", MARKER, "model.safetensors", "state.json"):
        (tdir / name).unlink(missing_ok=True)
    if (tdir / "methods").is_dir():
        log.info("--retrain-teacher: removing the method stages built on the shipped teacher (%s)", tdir / "methods")
        shutil.rmtree(tdir / "methods")


def teacher_source(tdir: Path) -> str:
    return "shipped" if is_shipped_copy(tdir) else "trained"


def ship(tdir: Path, command: str, trained_on: str, reproducibility: str) -> Path:
    """Copy the finished cache folder ``tdir`` into :data:`SHIPPED_DIR` with its ``shipped.json``."""
    tdir = Path(tdir)
    if not (tdir / "done.json").is_file():
        raise FileNotFoundError(f"{tdir} holds no finished teacher")
    dest = SHIPPED_DIR / tdir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(tdir / name, dest / name)
    import torch

    meta = {"teacher_id": tdir.name, "command": command, "trained_on": trained_on,
            "torch_version": torch.__version__, "train_seconds": json.loads((tdir / "done.json").read_text())[
                "elapsed_s"], "weights_sha256": sha256(tdir / "model.safetensors"),
            "reproducibility": reproducibility}
    (dest / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    return dest
