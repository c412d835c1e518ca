"""Synthetic traffic signs, ``scenes=hard`` (task version 3): distractors a pixel statistic cannot tell from the
sign, while ``scenes=easy`` stays version 1 pixel for pixel (its teacher id, shipped teacher and cache)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from lwbench.diagnostics import object_mask, recall
from lwbench.errors import ConfigError
from lwbench.methods.saliency import patch_edge_energy, patch_variance
from lwbench.tasks._synth import traffic_scene
from lwbench.tasks.traffic_signs import SCENES, TrafficSigns

# sha256 prefixes of version-1 scenes, computed with the code before hard scenes existed (commit 3db46ef)
VERSION1 = {("test", 1): "41dbf86feb1a08fe", ("train", 7): "58d98e67f0020d0f", ("val", 2): "3d1b40ff983a12e9"}


@pytest.mark.parametrize("split, index", list(VERSION1))
def test_easy_scenes_are_version_1_pixel_for_pixel(split, index):
    task = TrafficSigns(source="synthetic", img_size=(240, 320), scenes="easy")
    img = traffic_scene.render(task._scene_config(), 0, split, index)
    assert hashlib.sha256(np.asarray(img).tobytes()).hexdigest()[:16] == VERSION1[split, index]
    assert task.version == 1 and "scenes" not in task.opts and task.opts["sign_frac"] == (0.14, 0.18)


def test_hard_scenes_are_version_3_and_name_themselves():
    task = TrafficSigns(source="synthetic", img_size=(240, 320), scenes="hard")
    assert task.version == 3 and task.opts["scenes"] == "hard" and task.opts["sign_frac"] == SCENES["hard"]["sign_frac"]
    assert TrafficSigns(source="synthetic", img_size=(240, 320), scenes="easy").version == 1
    assert TrafficSigns(source="synthetic", img_size=(240, 320)).version == 1  # the default
    with pytest.raises(ConfigError, match="scenes must be one of easy, hard"):
        TrafficSigns(source="synthetic", img_size=(240, 320), scenes="harder")


def _top_recall(task, statistic, n: int = 48, k: int = 28) -> float:
    """Mean share of sign cells among the k patches a pixel statistic ranks highest, over n test scenes."""
    ds, out = task.dataset("test"), []
    for i in range(n):
        if traffic_scene.label_of(i) == 0:
            continue
        x = ds[i][0][None]
        top = statistic(x, 16)[0].topk(k).indices
        chosen = torch.zeros(1, 300, dtype=torch.bool)
        chosen[0, top] = True
        out.append(float(recall(chosen, object_mask(task, "test", i, (15, 20), 16)[None])[0]))
    return float(np.mean(out))


@pytest.mark.parametrize("statistic", [patch_variance, patch_edge_energy])
def test_a_pixel_statistic_finds_the_sign_in_easy_scenes_and_not_in_hard_ones(statistic):
    small = {"n_test": 48, "n_train": 8, "n_val": 8}
    easy = _top_recall(TrafficSigns(source="synthetic", img_size=(240, 320), scenes="easy", **small), statistic)
    hard = _top_recall(TrafficSigns(source="synthetic", img_size=(240, 320), scenes="hard", **small), statistic)
    assert easy > 0.8 and hard < easy - 0.25, (easy, hard)


def test_easy_scenes_keep_the_version_1_cache_key():
    """Caches drawn before hard scenes existed stay valid: the key is version 1's repr of the config."""
    cfg = TrafficSigns(source="synthetic", img_size=(240, 320), scenes="easy")._scene_config()
    assert cfg.cache_repr() == "SceneConfig(size=(240, 320), sign_frac=(0.14, 0.18), clutter=12)"
    hard = TrafficSigns(source="synthetic", img_size=(240, 320), scenes="hard")._scene_config()
    assert "textures=(6, 10)" in hard.cache_repr()

