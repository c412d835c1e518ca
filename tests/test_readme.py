"""The README's code blocks run as shown: every ``lwbench`` command of its shell blocks and both Python blocks.

Commands run with tiny settings appended (a 64x96 image, a few steps: the flags come after the README's own, so
they win), and placeholders (``DIR``, ``my_vits14.safetensors``) point at fixtures in the same layout. The set-up
block (pip, pytest) is what CI itself runs, so it is not run again here. A block this file does not know how to
run fails the test: a new README block needs a line here, not silence.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import make_imagenet

from lwbench.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["--set", "teacher.steps=2", "--set", "teacher.probe_steps=1", "--set", "teacher.batch_size=4",
         "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "eval.limit=8",
         "--set", "measure.min_run_time=0.05", "--set", "measure.throughput_batch=2", "--set", "measure.warmup=1",
         "--set", "measure.flops_images=1", "--set", "measure.isolate=false",
         "--set", "methods.lookwhere.distill.steps=1", "--set", "methods.lookwhere.distill.batch_size=4",
         "--set", "methods.lookwhere.finetune.steps=1", "--quiet"]
SYNTH = ["--img-size", "64x96", "--set", "task.n_train=32", "--set", "task.n_test=8", "--set", "task.n_val=8"]


def blocks(lang: str) -> list[str]:
    text = README.read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Shell lines joined at backslashes, split at ``&&``, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("#") or not line:
            continue
        out += [shlex.split(part) for part in line.split("&&")]
    return out


def test_readme_has_the_blocks_this_file_runs():
    bash, python = blocks("bash"), blocks("python")
    assert len(bash) == 3 and len(python) == 2, "a README code block was added or removed: teach this test to run it"
    assert [c[0] for c in commands(bash[0])] == ["pip", "python"]  # set-up: CI runs exactly these


def _without(argv: list[str], *dropped: str) -> list[str]:
    return [a for a in argv if a not in dropped]


def test_ci_installs_from_the_lock_and_tests_as_the_readme_says():
    """CI's install and test lines are the README's set-up block (quiet flags aside), the install takes the exact
    versions of ``constraints.txt``, and the lock pins every dependency pyproject.toml names (a new dependency
    needs ``.ci/latest --update-lock``)."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = README.parent
    pip, test = commands(blocks("bash")[0])
    ci = [shlex.split(line) for line in (root / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    (ci_pip,) = [c for c in ci if "install" in c and "-e" in c]
    assert _without(ci_pip[ci_pip.index("install"):], "-q") == pip[pip.index("install"):]
    assert ["-c", "constraints.txt"] == pip[pip.index("-c"):pip.index("-c") + 2]
    (ci_test,) = [c for c in ci if "pytest" in c]
    assert _without(ci_test, "-p", "no:cacheprovider") == test
    assert ["ruff", "check", "."] in ci
    lock = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not an exact pin"
            lock[name.strip().lower().replace("_", "-")] = version.strip()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for extra in ("dev", "seg") for d in project["optional-dependencies"][extra]]
    for spec in wanted:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} (pyproject.toml) is not pinned in constraints.txt: run .ci/latest --update-lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"constraints.txt pins {name}=={lock[name]}, " \
            f"outside pyproject.toml's {req.specifier}"


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """``DIR`` (an ImageFolder tree) and ``my_vits14.safetensors`` (a ViT-S/14 state dict, random weights)."""
    import timm
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("user")
    folder = make_imagenet(base / "DIR", classes=2, per_class=4, val_per_class=2)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    save_file(vit.state_dict(), str(base / "my_vits14.safetensors"))
    return {"DIR": str(folder), "my_vits14.safetensors": str(base / "my_vits14.safetensors")}


def _run(argv: list[str], user_files: dict, capsys) -> None:
    argv = [user_files.get(a, a) for a in argv]
    assert argv[0] == "lwbench", argv
    sub = argv[1]
    if sub == "run":
        extra = SMALL + ([] if "image_folder" in argv else SYNTH)
        if "image_folder" in argv:
            extra += ["--img-size", "56"]  # ViT-S/14 at 4x4 patches
        argv = argv + extra
    elif sub == "plot":
        argv = argv + ["--out", str(Path(user_files["DIR"]).parent / f"{argv[3]}.png")]
    assert main(argv[1:]) == 0, capsys.readouterr().err


def test_main_job_block_runs(user_files, capsys):
    (block,) = [b for b in blocks("bash") if "--method lookwhere --task traffic_signs" in b]
    cmds = commands(block)
    assert [c[:2] for c in cmds] == [["lwbench", "run"], ["lwbench", "plot"]]
    for argv in cmds:
        _run(argv, user_files, capsys)


def test_your_images_block_runs(user_files, capsys):
    (block,) = [b for b in blocks("bash") if "image_folder" in b]
    cmds = commands(block)
    assert len(cmds) == 1 and "--weights" in cmds[0]
    _run(cmds[0], user_files, capsys)


def test_adding_a_method_block_is_a_working_plugin(tmp_path, monkeypatch, capsys):
    (code,) = [b for b in blocks("python") if '@register_method("center")' in b]
    plugin = tmp_path / "center.py"
    plugin.write_text(code)
    # a fresh process: the plugin registers "center" in the global registry
    flops = subprocess.run([sys.executable, "-m", "lwbench", "flops", "--plugin", str(plugin), "--method", "center",
                            "--backbone", "lw_vit_test_p8", "--img-size", "32", "--budget", "k=4", "--json"],
                           capture_output=True, text=True)
    assert flops.returncode == 0, flops.stderr
    run = subprocess.run([sys.executable, "-m", "lwbench", "run", "--plugin", str(plugin), "--method", "center",
                          "--task", "traffic_signs", "--budget", "k=6", "--results", str(tmp_path / "res"),
                          *SMALL, *SYNTH, "--set", "method.margin=1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert list((tmp_path / "res").rglob("*.json"))


def test_python_api_block_runs(tmp_path, monkeypatch):
    """The API block as written, with its one training call made tiny (the same call, smaller settings)."""
    (code,) = [b for b in blocks("python") if "import lwbench" in b]
    call = '**{"teacher.steps": 50, "eval.limit": 64}'
    assert call in code, "the README's lwbench.run call changed: update the tiny settings here"
    tiny = ('img_size=(64, 96), **{"teacher.steps": 2, "eval.limit": 8, "train.steps": 1, "measure.isolate": False, '
            '"measure.min_run_time": 0.05, "measure.warmup": 1, "measure.flops_images": 1, '
            '"measure.throughput_batch": 2, "task.n_train": 32, "task.n_test": 8, "task.n_val": 8}')
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace(call, tiny), "README.md", "exec"), {})
