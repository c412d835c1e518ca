"""``lwbench speed`` (lwbench/speed.py): the grid, matched budgets, refusals, the CSV, resuming, the dry run.

Everything at tiny sizes (the 2-block test ViTs at 32-56 px) with a tiny timing budget, timed in this process
(``measure.isolate=false``): what is checked is the tool, not a speed."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch

from lwbench.cli import main
from lwbench.config import MeasureConfig
from lwbench.errors import ConfigError
from lwbench.speed import (
    COLUMNS,
    DEFAULT_BACKBONES,
    DEFAULT_BATCHES,
    DEFAULT_IMG_SIZES,
    done_keys,
    match_budget,
    pair_seconds,
    plan,
    plot_rows,
    read_rows,
    run_speed,
    speed_config,
)

# The timing budget of tests/test_docs.py's SMALL, shorter still, in this process.
TINY_MEASURE = {"min_run_time": 0.01, "min_runs": 2, "warmup": 1, "max_run_time": 0.05, "isolate": False}
TINY = {"backbones": ["lw_vit_test_p8"], "img_sizes": [(32, 48)], "batches": [1, 2], "threads": 1,
        "device": "cpu", "measure": TINY_MEASURE}
TINY_CLI = ["--backbones", "lw_vit_test_p8", "--img-sizes", "32x48", "--batches", "1,2", "--threads", "1",
            "--device", "cpu", *[a for k, v in TINY_MEASURE.items() for a in ("--set", f"measure.{k}={v}")]]


def test_the_default_grid_is_every_method_on_both_dinov2_backbones_at_224_518_and_the_4_3_traffic_signs():
    from lwbench.backbones import spec_of
    from lwbench.registry import METHODS

    cfg = speed_config()
    assert cfg.backbones == DEFAULT_BACKBONES == ("vit_small_patch14_dinov2", "vit_base_patch14_reg4_dinov2")
    assert cfg.img_sizes == DEFAULT_IMG_SIZES == ((224, 224), (518, 518), (504, 672))
    assert cfg.batches == DEFAULT_BATCHES == (1, 32)
    assert cfg.measure.flops_images == 1  # one random image, as `lwbench flops` counts
    points = plan(cfg)
    methods = METHODS.names()
    assert len(points) == 2 * 3 * len(methods) and not [p for p in points if p.refusal]
    assert [p.method for p in points[: len(methods)]] == methods
    assert {p.request for p in points} == {"default"}
    spec = spec_of("vit_base_patch14_reg4_dinov2", (504, 672))
    for p in points:
        if p.backbone == "vit_base_patch14_reg4_dinov2" and p.hw == (504, 672):
            cls = METHODS.get(p.method)
            want = "-" if cls.budget_key is None else f"{cls.budget_key}={cls.default_budget(spec):g}"
            assert p.budget == want, p


def test_budget_requests_expand_and_a_method_without_a_knob_runs_once():
    cfg = speed_config({**TINY, "methods": ["full", "random", "tome"], "budgets": ["default", "matched:0.25"]})
    got = [(p.method, p.request, p.budget) for p in plan(cfg)]
    assert got == [("full", "default", "-"), ("random", "default", "k=3"), ("random", "matched:0.25", "matched:0.25"),
                   ("tome", "default", "r=6"), ("tome", "matched:0.25", "matched:0.25")]
    for bad in ("matched:2", "matched:0", "fastest", "default:0.5"):
        with pytest.raises(ConfigError, match="--budgets"):
            speed_config({"budgets": [bad]})


def _gmacs_counter(method: str, backbone: str, hw, calls: list):
    import torch

    from lwbench.measure.flops import mean_macs_over
    from lwbench.models import build_model

    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))

    def gmacs_at(v):
        calls.append(v)
        budget = None if v is None else f"k={v}"
        return mean_macs_over(build_model(method, backbone, hw, budget, seed=0).model, x).gmacs

    return gmacs_at


def test_matched_budget_is_the_closest_in_gmacs_known_answer():
    from lwbench.backbones import spec_of
    from lwbench.registry import METHODS

    hw = (56, 56)  # lw_vit_test_p14: 4x4 = 16 patches
    cls, spec = METHODS.get("random"), spec_of("lw_vit_test_p14", hw)
    calls: list = []
    gmacs_at = _gmacs_counter("random", "lw_vit_test_p14", hw, calls)
    every = {k: gmacs_at(k) for k in range(1, 17)}  # GMACs grow with k: every answer, brute force
    assert all(every[k] < every[k + 1] for k in range(1, 16))
    for ratio in (0.3, 0.5, 0.8):
        target = ratio * every[16]  # k = 16 (every patch) is the plain backbone
        calls.clear()
        value, got = match_budget(cls, spec, target, gmacs_at)
        best = min(every, key=lambda k: abs(every[k] - target))
        assert value == best and got == pytest.approx(every[best]), ratio
        assert len(calls) < 16  # a search, not every budget


def test_matched_float_budget_interpolates_and_an_unreachable_target_gets_the_nearest_end():
    from lwbench.backbones import spec_of
    from lwbench.registry import METHODS

    spec = spec_of("lw_vit_test_p8", (32, 48))
    topk = METHODS.get("topk")  # keep_rate in (0, 1]; a stand-in count linear in it
    value, got = match_budget(topk, spec, 3.3, lambda v: 10 * v)
    assert value == pytest.approx(0.33) and got == pytest.approx(3.3)
    assert 0.5 == min(topk.budget_grid(spec))  # found below the grid: 0.25, then between 0.25 and 0.5
    random = METHODS.get("random")  # k >= 1: a target below k=1's count gets k=1
    calls: list = []
    value, got = match_budget(random, spec, 0.1, lambda k: calls.append(k) or float(k))
    assert value == 1 and got == 1.0 and len(calls) == len(set(calls))
    tome = METHODS.get("tome")  # r: fewer GMACs as r grows; past its grid up to the largest r it accepts here
    largest = max(r for r in range(100) if not _refuses(tome, spec, r))
    assert largest > max(tome.budget_grid(spec))
    value, got = match_budget(tome, spec, 1.0, lambda r: 100.0 - r)
    assert value == largest


def _refuses(cls, spec, budget) -> bool:
    from lwbench.errors import BudgetError

    try:
        cls(spec, budget)
    except BudgetError:
        return True
    return False


def test_a_refused_point_is_listed_with_its_reason_and_the_grid_goes_on(tmp_path):
    # EViT reads the class token's attention: a backbone without one (SigLIP) is refused, in one line, at planning
    cfg = speed_config({**TINY, "methods": ["evit", "full"], "backbones": ["vit_base_patch16_siglip_224"]})
    points = plan(cfg)
    refused = [p for p in points if p.refusal]
    assert [p.method for p in refused] == ["evit"] and "supports families" in refused[0].refusal
    assert "\n" not in refused[0].refusal
    cfg = speed_config({**TINY, "methods": ["evit"], "backbones": ["vit_base_patch16_siglip_224"]})
    run = run_speed(cfg, tmp_path)
    rows = read_rows(tmp_path / "speed.csv")
    assert [(r["method"], r["status"], r["batch"]) for r in rows] == [("evit", "refused", "")]
    assert "supports families" in rows[0]["reason"] and run.timed == 0
    table = (tmp_path / "table.md").read_text()
    assert "Not timed here:" in table and "- evit keep_rate=0.7: refused: evit: backbone" in table
    assert not (tmp_path / "conversion.png").exists()  # nothing timed: nothing to draw


def test_the_csv_has_its_columns_resume_skips_done_points_and_force_times_them_again(tmp_path, monkeypatch):
    cfg = speed_config({**TINY, "methods": ["full", "random"], "budgets": ["default", "matched:0.5"]})
    run = run_speed(cfg, tmp_path)
    assert run.timed == 3 and [f.name for f in run.files] == ["speed.csv", "table.md", "conversion.png"]
    with open(tmp_path / "speed.csv", newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == COLUMNS
    rows = read_rows(tmp_path / "speed.csv")
    assert [(r["method"], r["budget_request"], r["batch"], r["status"]) for r in rows] == [
        ("full", "default", "1", "ok"), ("full", "default", "2", "ok"), ("random", "default", "1", "ok"),
        ("random", "default", "2", "ok"), ("random", "matched:0.5", "1", "ok"), ("random", "matched:0.5", "2", "ok")]
    for r in rows:
        assert float(r["speedup"]) > 0 and float(r["ci_low"]) <= float(r["speedup"]) <= float(r["ci_high"])
        assert float(r["conversion"]) == pytest.approx(float(r["speedup"]) / float(r["gmac_ratio"]), rel=1e-4)
        assert r["kernel"] and r["threads"] == "1" and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["machine"] and r["commit"] and r["torch_version"] and int(r["quiet_rounds"]) >= 0
        assert r["reliable"] in ("true", "false")
    matched = next(r for r in rows if r["budget_request"] == "matched:0.5")
    assert matched["budget"].startswith("k=") and 0.4 < float(matched["gmac_fraction"]) < 0.6
    full = next(r for r in rows if r["method"] == "full")
    assert float(full["gmac_ratio"]) == 1.0 and full["training"] == "none"
    table = (tmp_path / "table.md").read_text()
    assert "## lw_vit_test_p8 at 32x48" in table and "batch 2: speed-up [95% CI]" in table
    order = [line.split("|")[1].strip() + " " + line.split("|")[2].strip() for line in table.splitlines()
             if line.startswith("| ") and "speed-up" not in line]
    assert order == ["full -", f"random {matched['budget']}", "random k=3"]  # sorted by GMACs, most first

    def no_timing(*a, **k):
        raise AssertionError("a done point was timed again")

    monkeypatch.setattr("lwbench.measure.contract.measure", no_timing)
    again = run_speed(cfg, tmp_path)
    assert again.timed == 0 and len(again.done) == 3 and read_rows(tmp_path / "speed.csv") == rows
    # another thread count is another place: nothing of it is done
    assert not run_speed(speed_config({**TINY, "methods": ["full"], "threads": 2}), tmp_path, dry_run=True).done
    monkeypatch.undo()
    forced = run_speed(speed_config({**TINY, "methods": ["full"]}), tmp_path, force=True)
    assert forced.timed == 1 and len(read_rows(tmp_path / "speed.csv")) == 6  # replaced, not appended


def test_done_keys_need_every_batch_and_retry_failures():
    ident = {"machine": "m", "commit": "c", "threads": "1", "device": "cpu", "dtype": "float32", "compile": "none",
             "inputs": "random:4"}
    row = {c: "" for c in COLUMNS} | ident | {"backbone": "b", "img_size": "32x48", "budget_request": "default"}
    rows = [row | {"method": "a", "status": "ok", "batch": "1"}, row | {"method": "a", "status": "ok", "batch": "2"},
            row | {"method": "b", "status": "ok", "batch": "1"},
            row | {"method": "c", "status": "refused"}, row | {"method": "d", "status": "failed"},
            row | {"method": "e", "status": "ok", "batch": "1", "threads": "2"}]
    done = done_keys(rows, ("m", "c", "1", "cpu", "float32", "none", "random:4"), (1, 2))
    assert {k[2] for k in done} == {"a", "c"}  # b lacks batch 2, d failed, e was timed with 2 threads
    compiled = done_keys(rows, ("m", "c", "1", "cpu", "float32", "default", "random:4"), (1, 2))
    assert compiled == set(), "eager rows are not a compiled run's"


def test_a_failing_point_is_a_row_and_the_grid_goes_on(tmp_path, monkeypatch):
    from lwbench import models

    real = models.build_model

    def broken(method, *a, **k):
        if method == "random":
            raise RuntimeError("boom")
        return real(method, *a, **k)

    monkeypatch.setattr(models, "build_model", broken)
    run_speed(speed_config({**TINY, "methods": ["random", "full"], "batches": [1]}), tmp_path)
    rows = read_rows(tmp_path / "speed.csv")
    assert [(r["method"], r["status"], r["reason"]) for r in rows] == [("random", "failed", "RuntimeError: boom"),
                                                                      ("full", "ok", "")]


def test_batch_1_comes_from_the_latency_pass_even_when_it_is_the_only_batch(tmp_path, monkeypatch):
    from types import SimpleNamespace

    # --batches 1: the latency pass is batch 1's only timing (lwbench.measure.paired does not time it twice), and
    # timing_batches' entry for it is that pass
    fixed = {"speedup": 1.5, "ci_low": 1.4, "ci_high": 1.6, "ms": 2.0, "reference_ms": 3.0, "rounds": 12,
             "quiet_rounds": 11, "contended": False}
    fake = SimpleNamespace(gmacs=1.0, reference_gmacs=2.0, gmac_ratio=2.0, tokens_mean=3.0, attention_kernel="math",
                           reference_attention_kernel="math", other_load=0.0, measure_isolated=True,
                           timing_batches=json.dumps({"1": fixed}), speedup=1.5, speedup_ci_low=1.4,
                           speedup_ci_high=1.6, latency_ms=2.0, reference_latency_ms=3.0, timing_rounds=12,
                           timing_quiet_rounds=11, timing_contended=False)
    monkeypatch.setattr("lwbench.measure.contract.measure", lambda *a, **k: fake)
    run_speed(speed_config({**TINY, "methods": ["random"], "batches": [1]}), tmp_path)
    (row,) = read_rows(tmp_path / "speed.csv")
    got = (row["batch"], row["speedup"], row["ms"], row["rounds"], row["quiet_rounds"])
    assert got == ("1", "1.5", "2", "12", "11")
    assert row["conversion"] == "0.75" and row["reliable"] == "true"


def test_dry_run_lists_points_pairs_and_an_estimate_and_runs_nothing(tmp_path, monkeypatch, capsys):
    def nothing(*a, **k):
        raise AssertionError("the dry run built or timed something")

    monkeypatch.setattr("lwbench.models.build_model", nothing)
    monkeypatch.setattr("lwbench.measure.contract.measure", nothing)
    out = tmp_path / "speed"
    assert main(["speed", "--dry-run", "--methods", "full,random,tome", *TINY_CLI, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 points: 3 to time, 0 done, 0 refused; batches 1, 2: 6 paired timings against full" in text
    assert "estimate: about" in text and "timed untrained" in text and "r=6" in text
    assert not out.exists()


def test_cli_errors_are_one_line(capsys):
    assert main(["speed", "--dry-run", "--budgets", "matched:3"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["speed", "--dry-run", "--methods", "tomee", *TINY_CLI]) == 2
    assert "Did you mean: tome" in capsys.readouterr().err
    assert main(["speed", "--dry-run", "--set", "train.lr=1", *TINY_CLI]) == 2
    assert "measure.KEY=VALUE" in capsys.readouterr().err


def test_limit_s_is_the_pairs_max_run_time_and_the_estimate_follows_the_protocol(tmp_path, monkeypatch):
    import lwbench.speed

    seen = []
    real = lwbench.speed.run_speed
    monkeypatch.setattr(lwbench.speed, "run_speed", lambda cfg, *a, **k: seen.append(cfg) or real(cfg, *a, **k))
    assert main(["speed", "--dry-run", "--methods", "full", *TINY_CLI, "--limit-s", "7", "--out", str(tmp_path)]) == 0
    assert seen[0].measure.max_run_time == 7.0 and seen[0].measure.min_runs == 2  # --set measure.* too
    m = MeasureConfig(warmup=5, min_runs=10, min_run_time=1.0)
    # 5 warm-up rounds and 10 timed rounds of one call of each model
    assert pair_seconds(1.0, 1.0, m) == pytest.approx(30.0)
    # fast calls: blocks of min_run_time / min_runs seconds of the slower model (5 calls), for 2 x min_run_time
    assert pair_seconds(0.01, 0.02, m) == pytest.approx(5 * 0.03 + 14 * 5 * 0.03)


def test_the_conversion_plot_has_a_panel_row_per_backbone_and_size():
    import pandas as pd

    from lwbench.plots import conversion_figure

    base = {c: "" for c in COLUMNS} | {"status": "ok", "device": "cpu", "device_name": "Test CPU", "threads": "2",
                                       "dtype": "float32", "budget_request": "default"}
    rows = []
    for backbone, size in (("vit_a", "224x224"), ("vit_a", "518x518")):
        for method, budget, ratio in (("full", "-", 1.0), ("tome", "r=8", 2.0)):
            for batch, s in ((1, 1.5), (32, 1.8)):
                rows.append(base | {"backbone": backbone, "img_size": size, "method": method, "budget": budget,
                                    "gmac_ratio": str(ratio), "batch": str(batch), "speedup": str(s),
                                    "ci_low": str(s - 0.1), "ci_high": str(s + 0.1), "reliable": "true"})
    points = [r for r in plot_rows(rows) if r["method"] != "full"]
    assert [json.loads(r["timing_batches"])["32"]["speedup"] for r in points] == [1.8, 1.8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = conversion_figure(pd.DataFrame(points), "speed reference", panel_by="geometry")
    axes = [ax for ax in fig.axes if (ax.get_gid() or "").startswith("panel:")]
    assert [ax.get_gid() for ax in axes] == ["panel:batch 1", "panel:batch 32"] * 2
    titles = [ax.get_title() for ax in axes]  # each panel names its geometry (the y labels stay short)
    assert titles[0].startswith("vit_a 224x224 · cpu: Test CPU, 2 threads") and titles[2].startswith("vit_a 518x518")


def test_one_geometry_is_named_once_in_the_conversion_title():
    import warnings

    import pandas as pd

    from lwbench.plots import conversion_figure

    base = {c: "" for c in COLUMNS} | {"status": "ok", "device": "cpu", "device_name": "Test CPU", "threads": "2",
                                       "dtype": "float32", "budget_request": "default", "backbone": "vit_a",
                                       "img_size": "518x518"}
    rows = [base | {"method": m, "budget": b, "gmac_ratio": g, "batch": "1", "speedup": g, "ci_low": g,
                    "ci_high": g, "reliable": "true"} for m, b, g in (("full", "-", "1.0"), ("tome", "r=8", "1.5"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = conversion_figure(pd.DataFrame(plot_rows(rows)), "speed reference", panel_by="geometry")
    title = fig._suptitle.get_text()
    assert title.count("vit_a") == 1 and "vit_a @ 518x518" in title and "cpu: Test CPU, 2 threads" in title, title


def test_real_weights_and_photos_are_what_both_models_run_on_and_rows_say_so(tmp_path, monkeypatch):
    """--weights/--photos: the method and full are built from the file, batch 1 cycles through the photos (resized,
    normalised), the rows name both, and a random-weights point of the same geometry is another point."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from lwbench.backbones import create_backbone
    from lwbench.speed import load_inputs

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("lw_vit_test_p8", (32, 48)).state_dict().items()},
              str(weights))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.fromarray(np.full((20, 30, 3), colour, dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "notes.txt").write_text("not an image")
    seen = []
    import lwbench.models

    real_build = lwbench.models.build_model

    def build(*a, **k):
        seen.append(k.get("weights"))
        return real_build(*a, **k)

    monkeypatch.setattr(lwbench.models, "build_model", build)
    cfg = speed_config({**TINY, "methods": ["random"], "batches": [1], "weights": {"lw_vit_test_p8": str(weights)},
                        "photos": str(photos)})
    images = load_inputs(cfg, [(32, 48)])[(32, 48)]
    assert images.shape == (2, 3, 32, 48)
    red = (1.0 - 0.485) / 0.229  # the first photo's red channel, normalised as the tasks do
    assert torch.allclose(images[0, 0], torch.full((32, 48), red), atol=1e-5)
    run_speed(cfg, tmp_path / "out")
    assert seen and set(seen) == {str(weights)}, "the method and full both load the file"
    (row,) = read_rows(tmp_path / "out" / "speed.csv")
    assert row["weights"] == "tiny.safetensors" and row["inputs"] == "photos:photos:2" and row["status"] == "ok"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## lw_vit_test_p8 at 32x48, weights tiny.safetensors" in table and "real photos (photos: 2)" in table
    random_point = plan(speed_config({**TINY, "methods": ["random"]}))[0]
    assert random_point.key != plan(cfg)[0].key


def test_bad_weights_and_photos_are_one_line_errors(tmp_path):
    from lwbench.errors import ConfigError

    (tmp_path / "empty").mkdir()
    for values, words in (({"weights": {"lw_vit_test_p8": str(tmp_path / "no.safetensors")}}, "not found"),
                          ({"weights": {"vit_other": str(tmp_path)}}, "not among the backbones"),
                          ({"photos": str(tmp_path / "empty")}, "no images")):
        with pytest.raises(ConfigError, match=words):
            speed_config({**TINY, **values})
    assert main(["speed", "--weights", "w.safetensors", "--dry-run", "--out", str(tmp_path)]) == 2


def test_report_redraws_from_the_csv_and_times_nothing(tmp_path, monkeypatch, capsys):
    run_speed(speed_config({**TINY, "methods": ["full", "random"], "batches": [1]}), tmp_path)
    (tmp_path / "table.md").unlink()
    (tmp_path / "conversion.png").unlink()

    def nothing(*a, **k):
        raise AssertionError("--report built or timed something")

    monkeypatch.setattr("lwbench.measure.contract.measure", nothing)
    assert main(["speed", "--report", "--out", str(tmp_path)]) == 0
    assert "redrew from 2 row(s)" in capsys.readouterr().out
    assert (tmp_path / "table.md").exists() and (tmp_path / "conversion.png").exists()
    assert main(["speed", "--report", "--out", str(tmp_path / "none")]) == 2
