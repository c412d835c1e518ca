"""The typed run configuration: coercion, unknown keys, ranges, and a run id that covers everything that
can change a number (the whole config, the weights and the data by content) and nothing that cannot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fixtures import make_imagenet

import lwbench
from lwbench.cli import main
from lwbench.config import resolve_config
from lwbench.errors import ConfigError
from lwbench.runner import Plan


def run_id(method="lookwhere", task="traffic_signs", budget=None, sets=(), **flags) -> str:
    return Plan(resolve_config(method, task, budget, sets=list(sets), source="synthetic", **flags)).run_id


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lwbench: error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


# -- identity ---------------------------------------------------------------------------------------------------
def test_every_section_is_in_the_run_id():
    """eval.limit, measure.* and threads used to share the full evaluation's id (skipped as 'already done')."""
    base = run_id()
    for change in ("eval.limit=16", "measure.warmup=2", "measure.min_run_time=0.5", "threads=1", "train.lr=1e-4",
                   "head.pool=avg", "teacher.attn_weight=0.2", "method.distill.steps=10", "task.clutter=3"):
        assert run_id(sets=[change]) != base, change


def test_paths_and_verbosity_are_not_in_the_run_id(tmp_path):
    assert run_id(results=str(tmp_path / "a"), quiet=True, force=True) == run_id(results=str(tmp_path / "b"))


def test_equal_numbers_hash_alike():
    assert run_id(sets=["train.lr=1e-5"]) == run_id(sets=["train.lr=0.00001"])
    assert run_id(sets=["method.finetune.lr=1e-5"]) == run_id(sets=["method.finetune.lr=0.00001"])
    assert run_id(sets=["teacher.steps=2000"]) == run_id(sets=["teacher.steps=2000.0"]) == run_id()


def test_stage_defaults_resolve_before_hashing():
    """A stage left unset hashes as the numbers it inherits: setting them explicitly is the same run."""
    cfg = resolve_config("random", "traffic_signs", "k=8", source="synthetic")
    assert cfg.method_opts.finetune.steps == cfg.train.steps == 100
    assert run_id("random", budget="k=8", sets=["method.finetune.steps=100"]) == run_id("random", budget="k=8")
    assert run_id("random", budget="k=8", sets=["train.steps=5"]) != run_id("random", budget="k=8")


def test_weights_enter_by_content(tmp_path):
    from lwbench.backbones import create_backbone

    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(create_backbone("lw_vit_test_p8", 32).state_dict(), str(path))
    first = run_id("full", backbone="lw_vit_test_p8", img_size=(32, 32), weights=str(path))
    torch.manual_seed(1)  # "retrained": same path, other weights
    save_file(create_backbone("lw_vit_test_p8", 32).state_dict(), str(path))
    os.utime(path, ns=(1, 1))
    second = run_id("full", backbone="lw_vit_test_p8", img_size=(32, 32), weights=str(path))
    assert first != second
    moved = tmp_path / "elsewhere.safetensors"
    path.rename(moved)
    assert run_id("full", backbone="lw_vit_test_p8", img_size=(32, 32), weights=str(moved)) == second


def test_the_data_is_in_the_run_and_teacher_ids(tmp_path):
    a = make_imagenet(tmp_path / "a")
    b = make_imagenet(tmp_path / "b", classes=4)

    def plan(root):
        return Plan(resolve_config("full", "imagenet", source="real", data_root=str(root), img_size=(32, 32),
                                   backbone="lw_vit_test_p8"))

    pa, pb = plan(a), plan(b)
    assert pa.run_id != pb.run_id and pa.teacher_id != pb.teacher_id
    assert pa.config["data"]["fingerprint"] != pb.config["data"]["fingerprint"]
    again = plan(a)
    assert again.run_id == pa.run_id
    extra = next((a / "train").iterdir()) / "added.JPEG"  # the same folder with a file added is other data
    extra.write_bytes(next(next((a / "train").iterdir()).glob("*.JPEG")).read_bytes())
    assert plan(a).run_id != pa.run_id


def test_replicates_share_a_replicate_id():
    p0 = Plan(resolve_config("random", "traffic_signs", "k=8", source="synthetic", seed=0))
    p1 = Plan(resolve_config("random", "traffic_signs", "k=8", source="synthetic", seed=1))
    p2 = Plan(resolve_config("random", "traffic_signs", "k=8", source="synthetic", seed=1, sets=["train.steps=5"]))
    assert p0.run_id != p1.run_id and p0.replicate_id == p1.replicate_id != p2.replicate_id


# -- bad input: one line, nothing run ---------------------------------------------------------------------------
@pytest.mark.parametrize("item,words", [
    ("trian.lr=1", "did you mean 'train.lr'"),
    ("teacher.stesp=5", "did you mean 'teacher.steps'"),
    ("method.distil.steps=2", "did you mean 'method.distill.steps'"),
    ("methods.lookwere.x=1", "lookwhere"),
    ("teacher.steps=abc", "teacher.steps: 'abc' is not an integer"),
    ("teacher=5", "'teacher' is a section"),
    ("teacher.batch_size=0", "teacher.batch_size: 0 must be >= 1"),
    ("eval.limit=0", "eval.limit: 0 must be >= 1"),
    ("measure.throughput_batch=0", "measure.throughput_batch: 0 must be >= 1"),
    ("train.lr=nan", "not a finite number"),
    ("train.lr=-1", "must be > 0"),
    ("measure.dtype=fp32", "not one of float32"),
    ("task.clutterr=3", "did you mean 'clutter'"),
])
def test_bad_set_is_one_line(capsys, item, words):
    assert main(["run", "--method", "lookwhere", "--task", "traffic_signs", "--set", item]) == 2
    assert words in _one_line_error(capsys)


@pytest.mark.parametrize("budget", ["k=nan", "k=inf", "k=2.5", "k=0"])
def test_bad_budget_is_one_line(capsys, budget):
    assert main(["run", "--method", "random", "--task", "traffic_signs", "--budget", budget]) == 2
    assert "random" in _one_line_error(capsys)


def test_broken_plugins_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def f(:\n")
    assert main(["list", "methods", "--plugin", str(bad)]) == 2
    assert "syntax error at line 1" in _one_line_error(capsys)
    missing = tmp_path / "bad_import.py"
    missing.write_text("import no_such_module_here\n")
    assert main(["list", "methods", "--plugin", str(missing)]) == 2
    assert "ModuleNotFoundError" in _one_line_error(capsys)


def test_unwritable_results_folder_fails_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--method", "full", "--task", "traffic_signs", "--results", str(blocker)]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert not (Path(os.environ["LWBENCH_CACHE"]) / "teachers").exists()  # no teacher was trained


def test_paper_profile_offline_refuses_instead_of_training_from_scratch(capsys, monkeypatch):
    import timm

    def offline(*a, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*a, **kw)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    argv = ["run", "--method", "full", "--task", "traffic_signs", "--profile", "paper", "--source", "synthetic",
            "--set", "eval.limit=1"]
    assert main(argv) == 2
    assert "pretrained weights for vit_base_patch14_reg4_dinov2 are not available" in _one_line_error(capsys)
    assert not list(Path(os.environ["LWBENCH_CACHE"]).rglob("model.safetensors"))


# -- config show, list --opts, the Python API ----------------------------------------------------------------
def test_config_show_prints_the_resolved_config_and_id(capsys):
    assert main(["config", "show", "--method", "lookwhere", "--task", "traffic_signs", "--set", "eval.limit=16",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    expected = run_id(sets=["eval.limit=16"])
    assert f"# run id {expected}" in out and "limit: 16" in out and "selector_size: 64x96" in out
    assert main(["run", "--method", "lookwhere", "--task", "traffic_signs", "--dry-run", "--quiet"]) == 0
    assert f"# run id {run_id()}" in capsys.readouterr().out
    assert not (Path(os.environ["LWBENCH_CACHE"]) / "teachers").exists()


def test_list_opts_prints_a_methods_options(capsys):
    assert main(["list", "methods", "--opts", "lookwhere"]) == 0
    out = capsys.readouterr().out
    for key in ("selector_size", "distill.steps", "finetune.lr", "attn_queries"):
        assert key in out


def test_python_api():
    assert lwbench.__version__ and "lookwhere" in lwbench.list_methods()
    model = lwbench.create_model("tome", "lw_vit_test_p8", 32, "r=2", num_classes=5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    cfg = lwbench.configure("lookwhere", "traffic_signs", "k=8", seed=2,
                            **{"train.lr": 1e-4, "method.distill.steps": 3})
    assert cfg.seed == 2 and cfg.train.lr == 1e-4 and cfg.method_opts.distill.steps == 3


def test_every_row_key_is_declared(tmp_path):
    """One schema: the runner writes no column the schema does not declare."""
    from lwbench.schema import FIELD_NAMES

    row = lwbench.run("full", "traffic_signs", source="synthetic", img_size=(32, 48), backbone="lw_vit_test_p8",
                      quiet=True, **{"teacher.steps": 2, "teacher.batch_size": 4, "eval.limit": 4,
                                     "measure.isolate": False, "measure.min_run_time": 0.01, "measure.warmup": 0,
                                     "measure.throughput_batch": 2, "measure.flops_images": 1, "task.n_train": 8,
                                     "task.n_test": 4, "task.n_val": 4})
    assert set(row) <= set(FIELD_NAMES), sorted(set(row) - set(FIELD_NAMES))
    assert row["flops_counter"] == "fvcore" and row["flops_check_gmacs"] >= row["gmacs"] * 0.99
    assert row["measure_warmup"] == 0 and row["latency_runs"] >= 1
    assert json.loads(json.dumps(row["config"]))["eval"]["limit"] == 4


PROBE = '''
import torch
from lwbench.method import Method, detach_copy
from lwbench.registry import register_method
from lwbench.vit import FullEncoder


class TensordotEncoder(FullEncoder):
    """Adds a tensordot on the patch tokens: real work fvcore has no formula for."""

    def forward(self, x):
        out = super().forward(x)
        w = torch.eye(out.patches.shape[-1], device=x.device)
        out.patches = torch.tensordot(out.patches, w, dims=1)
        return out


@register_method("tensordot_probe")
class TensordotProbe(Method):
    description = "full + an op the MAC counters cannot see (test)"
    kind = "baseline"

    def build(self, vit):
        return TensordotEncoder(detach_copy(vit))
'''


def test_run_refuses_a_flop_count_the_way_flops_does(capsys, tmp_path):
    plugin = tmp_path / "probe.py"
    plugin.write_text(PROBE)
    tiny = ["--img-size", "32x48", "--backbone", "lw_vit_test_p8", "--source", "synthetic", "--set",
            "teacher.steps=0", "--set", "eval.limit=4", "--set", "measure.isolate=false", "--set",
            "task.n_test=4", "--set", "task.n_train=4", "--set", "task.n_val=4", "--quiet", "--plugin", str(plugin)]
    assert main(["run", "--method", "tensordot_probe", "--task", "traffic_signs", *tiny]) == 2
    assert "but torch.utils.flop_counter" in _one_line_error(capsys)
    assert not list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))  # no row with a silently low count
    assert main(["flops", "--method", "tensordot_probe", "--backbone", "lw_vit_test_p8", "--img-size", "32x48",
                 "--plugin", str(plugin)]) == 2
    assert "but torch.utils.flop_counter" in _one_line_error(capsys)


def test_unknown_profile_key_is_refused(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("name: p\ndefaults: {backbone: lw_vit_test_p8, finetune: {steps: 2}}\n")
    with pytest.raises(ConfigError, match="unknown key 'finetune'"):
        resolve_config("full", "traffic_signs", profile=str(prof))
