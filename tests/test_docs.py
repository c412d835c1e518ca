"""The README's and docs/*.md's code blocks run as shown, and what they point at exists.

Each page runs top to bottom in a fresh folder, as a reader would type it:

- ``bash`` blocks: every ``lwbench`` command, with tiny settings appended (a small image, a few steps, short
  timing: the flags come after the page's own, so they win) and placeholders (``DIR``, ``W.pth``, ...) pointed at
  fixtures in the same layout. Commands of a page that uses ``--plugin`` run in one fresh process (a plugin
  registers its name for good). The README's set-up block (pip, pytest) is what CI itself runs, so it is not run
  again (``tests/test_readme.py`` checks that CI runs exactly it).
- a block whose first line is ``# save as NAME`` (a plugin, a sweep file) is saved as NAME for the commands after it;
  another ``python`` block is executed with its one training call made tiny; a ``toml`` block must parse and name
  lwbench's entry-point groups.

A block or a command this file does not know how to run fails the test: a new block needs a line here, not silence.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import make_imagenet

from lwbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
REFERENCE = ROOT / "benchmarks" / "reference" / "traffic_signs"

SMALL = ["--set", "teacher.steps=2", "--set", "teacher.probe_steps=1", "--set", "teacher.batch_size=4",
         "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "eval.limit=8",
         "--set", "measure.min_run_time=0.01", "--set", "measure.throughput_batch=2", "--set", "measure.warmup=1",
         "--set", "measure.flops_images=1", "--set", "measure.isolate=false", "--set", "measure.max_run_time=0.2",
         "--set", "measure.min_runs=2", "--set", "threads=1",
         "--set", "methods.lookwhere.distill.steps=1", "--set", "methods.lookwhere.distill.batch_size=4",
         "--set", "methods.lookwhere.finetune.steps=1", "--quiet"]
SYNTH = ["--img-size", "96x128", "--set", "task.n_train=32", "--set", "task.n_test=8", "--set", "task.n_val=8"]
# `lwbench pretrain` at paper scale (ViT-B/14 at 504x672, 100000 steps) becomes the same command on a 3-block
# patch-14 test ViT at 56 px for one step.
PRETRAIN_MODELS = {"vit_base_patch14_reg4_dinov2": "lw_vit_test_p14"}
PRETRAIN_SMALL = ["--img-size", "56", "--selector-size", "28", "--steps", "1", "--batch-size", "2", "--quiet"]
# The one training call of the Python API page, and the same call at tiny settings.
API_CALL = '**{"teacher.steps": 50, "eval.limit": 64}'
API_TINY = ('img_size=(96, 128), **{"teacher.steps": 2, "teacher.probe_steps": 1, "teacher.batch_size": 4, '
            '"eval.limit": 8, "train.steps": 1, "train.batch_size": 4, "measure.isolate": False, '
            '"measure.min_run_time": 0.01, "measure.warmup": 1, "measure.flops_images": 1, '
            '"measure.max_run_time": 0.2, "measure.min_runs": 2, "measure.throughput_batch": 2, "task.n_train": 32, '
            '"task.n_test": 8, "task.n_val": 8, "threads": 1}')  # SMALL and SYNTH's settings: the same tiny teacher
# What a page's command must print (numbers the page states).
EXPECT = {("methods.md", "flops"): ["14.77", "3.09"]}
RUNS_AS_IS = {"list", "config", "flops", "results", "report", "cache", "recommend"}


def blocks(page: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in page order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Shell lines joined at backslashes, split at ``&&``, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("#") or not line:
            continue
        out += [shlex.split(part) for part in line.split("&&")]
    return out


def saved_as(code: str) -> str | None:
    m = re.match(r"# save as (\S+)\n", code)
    return m.group(1) if m else None


def is_setup_block(page: Path, lang: str, code: str) -> bool:
    """The README's set-up block: CI runs it (tests/test_readme.py)."""
    return page == README and lang == "bash" and [c[0] for c in commands(code)] == ["pip", "python"]


def tiny(argv: list[str], files: dict[str, str]) -> list[str]:
    """``argv`` as the test runs it: placeholders mapped, repository inputs made absolute, tiny settings appended."""
    assert argv[0] == "lwbench", f"test_docs does not know how to run {shlex.join(argv)!r}: teach it"
    argv = [files.get(a, a) for a in argv]
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
    sub = argv[1]
    if sub in ("run", "show", "compare") or (sub == "sweep" and "--dry-run" not in argv):
        return argv + SMALL + (["--img-size", "56"] if "image_folder" in argv else SYNTH)  # ViT-S/14: 4x4 patches
    if sub == "sweep":
        return argv
    if sub == "plot":
        return argv if "--out" in argv else argv + ["--out", f"{argv[2]}.png"]
    if sub == "pretrain":
        return [PRETRAIN_MODELS.get(a, a) for a in argv] + PRETRAIN_SMALL
    assert sub in RUNS_AS_IS, f"test_docs does not know how to run 'lwbench {sub}': teach it"
    return argv


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The pages' placeholders: ``DIR`` (an ImageFolder tree; also ``DIR_OR_TASK``), ``my_vits14.safetensors`` (a
    ViT-S/14 state dict, random weights) and ``W.pth`` (the pretrain teacher's, for its tiny stand-in)."""
    import timm
    from safetensors.torch import save_file

    from lwbench.backbones import create_backbone

    base = tmp_path_factory.mktemp("user")
    folder = str(make_imagenet(base / "DIR", classes=2, per_class=4, val_per_class=2))
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    save_file(vit.state_dict(), str(base / "my_vits14.safetensors"))
    torch.save(create_backbone("lw_vit_test_p14", (56, 56)).state_dict(), base / "W.pth")
    return {"DIR": folder, "DIR_OR_TASK": folder, "my_vits14.safetensors": str(base / "my_vits14.safetensors"),
            "W.pth": str(base / "W.pth")}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for every page: the tiny teachers and scenes are the same wherever a page asks for them."""
    return tmp_path_factory.mktemp("cache")


def test_every_block_is_one_the_runner_knows():
    """Before anything runs: every block's language, and every command's program and subcommand, is one this file
    runs (a toml block must name lwbench's entry-point groups)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    for page in PAGES:
        for lang, code in blocks(page):
            where = f"{page.relative_to(ROOT)}: {lang or 'unlabelled'} block {code[:60]!r}"
            if is_setup_block(page, lang, code):
                continue
            if lang == "bash":
                for argv in commands(code):
                    tiny(argv, {})
            elif lang == "toml":
                groups = set(tomllib.loads(code)["project"]["entry-points"])
                assert groups <= {"lwbench.methods", "lwbench.tasks"}, where
            elif lang == "python":
                assert saved_as(code) or API_CALL in code, f"{where}: teach test_docs to run it"
            else:
                assert lang == "yaml" and saved_as(code), f"{where}: teach test_docs to run it"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs(page, files, shared_cache, tmp_path, monkeypatch, capsys):
    """The page's blocks in order, in a fresh folder; one thread (two threads on a busy 2-core machine wait for each
    other: a tiny forward took 0.3 s instead of 10 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_page(page, files, shared_cache, tmp_path, monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_page(page, files, shared_cache, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LWBENCH_CACHE", str(shared_cache))
    todo: list[list[str]] = []
    for lang, code in blocks(page):
        if is_setup_block(page, lang, code):
            continue
        if name := saved_as(code):
            (work / name).write_text(code)
        elif lang == "bash":
            todo += [tiny(argv, files)[1:] for argv in commands(code)]
        elif lang == "python":
            assert API_CALL in code, "the API page's lwbench.run call changed: update API_CALL / API_TINY here"
            exec(compile(code.replace(API_CALL, API_TINY), str(page), "exec"), {})
    outputs = []
    if any("--plugin" in argv for argv in todo):  # a fresh process: the plugin registers its names for good
        driver = ("import json, sys\nimport torch\nfrom lwbench.cli import main\ntorch.set_num_threads(1)\n"
                  "for argv in json.loads(sys.argv[1]):\n"
                  "    print('>>>', ' '.join(argv), flush=True)\n"
                  "    if main(argv) != 0: sys.exit(f'failed: lwbench {\" \".join(argv)}')\n")
        res = subprocess.run([sys.executable, "-c", driver, json.dumps(todo)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        outputs = res.stdout.split(">>> ")[1:]
    else:
        for argv in todo:
            rc = main(argv)
            out, err = capsys.readouterr()
            assert rc == 0, f"lwbench {shlex.join(argv)}\n{err}"
            outputs.append(" ".join(argv) + "\n" + out)
    for (name, sub), wanted in EXPECT.items():
        if page.name == name:
            (out,) = [o for o in outputs if o.split()[0] == sub]
            for text in wanted:
                assert text in out, f"{name}: `lwbench {sub}` no longer prints {text}"
    for argv in todo:  # what the commands said they would write is there
        if "--out" in argv:
            assert (work / argv[argv.index("--out") + 1]).exists(), argv
    assert todo or page.name in ("README.md", "python_api.md") or page == ROOT / "docs" / "README.md", \
        f"{page.name} runs no command"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_links_resolve_and_the_index_lists_every_page():
    linked = ROOT / "benchmarks"
    for page in [*PAGES, linked / "findings.md", linked / "timings.md", linked / "reference" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.relative_to(ROOT)}: no heading #{anchor}"
    index = (ROOT / "docs" / "README.md").read_text()
    for page in DOCS:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"


def _list_methods(capsys) -> dict[str, str]:
    """``lwbench list methods`` as {method: budget key}."""
    assert main(["list", "methods"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()  # descriptions and notes follow a blank line
    rows = [ln.split() for ln in table[2:]]
    return {r[0]: r[3].split("=")[0] for r in rows}  # the budget column: key=value, "-" without a knob


def test_methods_page_describes_exactly_the_registered_methods(capsys):
    """The methods table is not a second list to keep: it names exactly what ``lwbench list methods`` prints, with
    the same budget keys."""
    from lwbench.registry import METHODS

    # the built-ins: plugins that other tests of this process loaded (--plugin) are listed too
    listed = {name: key for name, key in _list_methods(capsys).items() if name in METHODS._builtins}
    described = {}
    for line in (ROOT / "docs" / "methods.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            key = cells[2].split()[0].strip("`")
            described.update({name: key for name in re.findall(r"`(\w+)`", cells[0])})
    assert described == listed


def _number(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.?\d*", text)]


def test_readme_headline_table_is_the_committed_reference():
    """Every number of the README's headline table is the committed reference's (rows.csv, and table.md's paired
    differences), as rounded there."""
    rows = list(csv.DictReader((REFERENCE / "rows.csv").open()))
    paired = {}
    section = (REFERENCE / "table.md").read_text().split("## Paired difference to `full`")[1].split("\n## ")[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[2] == "finetuned" and "[" in cells[6]:
            paired[(cells[0], cells[1])] = cells[6]
    table = [ln for ln in README.read_text().splitlines() if ln.startswith("| `")]
    assert len(table) >= 10
    for line in table:
        name, regime, top1, recall, gmacs, sp1, sp32, diff = [c.strip() for c in line.strip("|").split("|")]
        method = re.match(r"`(\w+)`", name).group(1)
        budget = re.sub(r"^keep ", "keep_rate=", name.split("`")[2].split("(")[0].strip()) or "-"
        regimes = [r.strip().replace("fine-tuned", "finetuned").replace("off the shelf", "off_the_shelf")
                   for r in regime.split("/")]
        by_regime = {r["regime"]: r for r in rows if r["method"] == method and r["budget"] == budget}
        first = by_regime[regimes[0]]
        if len(regimes) == 1:  # "95.3 [94.0, 96.7]"
            assert _number(top1) == [round(float(first[k]), 1) for k in
                                     ("metric_value", "metric_ci_low", "metric_ci_high")], line
        else:  # "95.3 / 95.8"
            assert _number(top1) == [round(float(by_regime[r]["metric_value"]), 1) for r in regimes], line
        recalls = [by_regime[r]["object_recall"] for r in regimes]
        if recall != "-":
            assert all(_number(recall)[i] == round(float(recalls[min(i, len(recalls) - 1)]), 2)
                       for i in range(len(_number(recall)))), line
        assert _number(gmacs)[0] == float(f"{float(first['gmacs']):.3g}"), line
        for cell, key in ((sp1, "speedup"), (sp32, "throughput_speedup")):
            want = [round(float(first[k]), 2) for k in (key, f"{key}_ci_low", f"{key}_ci_high")]
            assert _number(cell.replace("A/A", ""))[:3] == want, line
        if diff not in ("", "-"):
            assert _number(diff) == _number(paired[(method, budget)]), line
        assert not math.isnan(float(first["metric_value"]))
