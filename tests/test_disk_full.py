"""A full disk under the results folder or the cache: one line, nothing half-written, nothing computed lost.

The disk is filled by making the writes fail as a full disk makes them fail (``ENOSPC`` from ``open``/``write``;
safetensors' ``I/O error: No space left on device``), which needs no root and no small file system."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lwbench import runner
from lwbench.cli import main
from lwbench.paths import cache_dir, out_of_space
from lwbench.results import ResultStore

TINY = ["--method", "full", "--task", "traffic_signs", "--img-size", "64x96", "--set", "teacher.steps=4",
        "--set", "teacher.batch_size=8", "--set", "eval.limit=16", "--set", "measure.min_run_time=0.05",
        "--set", "measure.throughput_batch=4", "--set", "measure.warmup=1", "--set", "measure.flops_images=2",
        "--set", "measure.isolate=false", "--set", "task.n_train=64", "--set", "task.n_test=16",
        "--set", "task.n_val=8", "--quiet"]


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("lwbench: error:")]


def test_a_full_results_disk_keeps_the_row_and_the_next_run_stores_it(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    write = ResultStore.write

    def full_disk(self, row):
        if Path(self.root) == results:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, row)

    monkeypatch.setattr(ResultStore, "write", full_disk)
    assert main(["run", *TINY, "--results", str(results)]) == 2
    (line,) = _errors(capsys)
    assert "could not write the result row" in line and "no space left" in line and "kept in" in line
    kept = Path(line.split("kept in ", 1)[1].split(";")[0])
    assert kept.is_file() and kept.with_suffix(".per_image.npz").is_file()
    assert not list(results.rglob("*.npz")), "a per-image file without its row was left behind"

    monkeypatch.setattr(ResultStore, "write", write)  # space freed
    monkeypatch.setattr(runner, "fit_method", lambda plan: pytest.fail("recomputed a row that was kept"))
    assert main(["run", *TINY, "--results", str(results)]) == 0
    (row,) = ResultStore(results).rows()
    assert row["run_id"] == kept.stem and ResultStore(results).per_image(row)
    assert not kept.exists()


def test_a_full_cache_disk_is_one_line_and_leaves_no_half_teacher(monkeypatch, capsys):
    """The teacher folder used to be left with only ``config.json`` and ``.lock`` after a traceback."""
    import lwbench.training.loop as loop

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(loop, "save_model", full_disk)
    assert main(["run", *TINY]) == 2
    (line,) = _errors(capsys)
    assert "no space left on the disk of the cache" in line and "LWBENCH_CACHE" in line
    assert not list((cache_dir() / "teachers").iterdir()), "a teacher folder with nothing to resume was left"
    assert not list((cache_dir() / "teachers").rglob("*.tmp"))


def test_a_results_folder_on_a_full_disk_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "free_bytes", lambda folder: 0)
    monkeypatch.setattr(runner, "fit_method", lambda plan: pytest.fail("trained before checking the disk"))
    assert main(["run", *TINY]) == 2
    (line,) = _errors(capsys)
    assert "is on a full disk (0 bytes free)" in line


def test_out_of_space_reads_every_library_s_words(tmp_path, monkeypatch):
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(RuntimeError("I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "x")
    assert out_of_space(wrapped)
    # torch.save's own words for a full disk name no cause: the free space decides
    pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    import lwbench.paths as paths

    monkeypatch.setattr(paths, "free_bytes", lambda folder: 10 << 30)
    assert not out_of_space(pos, tmp_path) and not out_of_space(ValueError("bad"), tmp_path)
    monkeypatch.setattr(paths, "free_bytes", lambda folder: 1000)
    assert out_of_space(pos, tmp_path) and not out_of_space(ValueError("bad"), tmp_path)
