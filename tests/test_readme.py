"""The README is a front page whose set-up block is what CI runs.

Its other blocks (the main job) run in ``tests/test_docs.py`` with every docs page's, by the same rules. Here: the
README has the set-up block and the main command, and CI installs and tests exactly as that block says.
"""

from __future__ import annotations

import shlex

import pytest
from test_docs import README, blocks, commands


def bash_blocks() -> list[str]:
    return [code for lang, code in blocks(README) if lang == "bash"]


def test_readme_has_the_set_up_block_and_the_main_job():
    bash = bash_blocks()
    assert [c[0] for c in commands(bash[0])] == ["pip", "python"]  # set-up: CI runs exactly these
    assert ["lwbench", "run", "--method", "lookwhere", "--task", "traffic_signs"] in commands(bash[1])
    assert len(README.read_text().splitlines()) <= 150, "the README is a front page: move the rest to docs/"


def _without(argv: list[str], *dropped: str) -> list[str]:
    return [a for a in argv if a not in dropped]


def test_ci_installs_from_the_lock_and_tests_as_the_readme_says():
    """CI's install and test lines are the README's set-up block (quiet flags aside), the install takes the exact
    versions of ``constraints.txt``, and the lock pins every dependency pyproject.toml names (a new dependency
    needs ``.ci/latest --update-lock``)."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = README.parent
    pip, test = commands(bash_blocks()[0])
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


def test_the_cpu_only_install_note_pins_the_locked_torch():
    """A CPU-only machine installs PyTorch's CPU wheels first (no ~3 GB of CUDA libraries); the versions the README
    names are the lock's, so the set-up command after it keeps them."""
    import re

    lock = dict(line.split("==") for line in (README.parent / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    text = README.read_text()
    (line,) = [ln for ln in text.split("`") if "download.pytorch.org/whl/cpu" in ln]
    assert re.fullmatch(r"pip install torch==\S+ torchvision==\S+ --index-url https://download\.pytorch\.org/whl/cpu",
                        line), line
    argv = shlex.split(line)
    assert f"torch=={lock['torch']}" in argv and f"torchvision=={lock['torchvision']}" in argv
