"""What identifies real data in the run and teacher ids: ``folder_fingerprint`` over the whole tree.

ImageNet's layout is three levels deep (``train/<wnid>/*.JPEG``); images rewritten there in place (same names)
are other data, so a rerun must not answer "already done" nor reuse the teacher trained on the old pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from fixtures import make_imagenet
from PIL import Image

import lwbench.task
from lwbench.config import resolve_config
from lwbench.registry import get_task
from lwbench.runner import Plan
from lwbench.task import folder_fingerprint


def _first_image(root: Path) -> Path:
    return sorted((root / "train").rglob("*.JPEG"))[0]


def _plan(root: Path) -> Plan:
    return Plan(resolve_config("full", "imagenet", source="real", data_root=str(root), img_size=(32, 32),
                               backbone="lw_vit_test_p8"))


def test_unchanged_tree_keeps_its_fingerprint(tmp_path):
    root = make_imagenet(tmp_path / "in")
    assert folder_fingerprint(root) == folder_fingerprint(root)


def test_an_image_rewritten_in_place_three_levels_down_is_other_data(tmp_path):
    root = make_imagenet(tmp_path / "in")
    before = folder_fingerprint(root)
    path = _first_image(root)
    inverted = 255 - np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(inverted).save(path, "JPEG", quality=90)  # same name, new pixels
    assert folder_fingerprint(root) != before


def test_an_edit_that_keeps_size_and_mtime_is_caught_in_a_small_tree(tmp_path):
    """Every file of a tree of up to 256 files has its bytes sampled: flipping bytes and restoring the mtime with
    ``os.utime`` still changes the fingerprint."""
    root = make_imagenet(tmp_path / "in")
    before = folder_fingerprint(root)
    path = _first_image(root)
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert folder_fingerprint(root) != before


def test_rewritten_images_give_a_new_run_and_teacher(tmp_path):
    root = make_imagenet(tmp_path / "in")
    old = _plan(root)
    path = _first_image(root)
    Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(path, "JPEG", quality=90)
    new = _plan(root)
    assert new.run_id != old.run_id and new.teacher_id != old.teacher_id


def test_a_symlink_loop_ends_the_walk(tmp_path):
    root = make_imagenet(tmp_path / "in")
    os.symlink("../..", root / "train" / sorted(os.listdir(root / "train"))[0] / "loop")
    first = folder_fingerprint(root)
    assert first == folder_fingerprint(root)


def test_data_identity_walks_once_per_task_and_synthetic_is_unchanged(tmp_path, monkeypatch):
    root = make_imagenet(tmp_path / "in")
    calls = []
    real = lwbench.task.folder_fingerprint
    monkeypatch.setattr(lwbench.task, "folder_fingerprint", lambda r: calls.append(r) or real(r))
    task = get_task("imagenet")(source="real", data_root=root, img_size=32)
    first = task.data_identity()
    first["fingerprint"] = "tampered"  # a caller editing its copy does not edit the memo
    assert task.data_identity() == {"source": "real", "root": str(root.resolve()), "fingerprint": real(root)}
    assert len(calls) == 1
    assert get_task("traffic_signs")(source="synthetic").data_identity() == {"source": "synthetic"}
