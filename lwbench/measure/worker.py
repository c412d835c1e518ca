"""Measure one model in a fresh Python process: ``python -m lwbench.measure.worker [--parent-pid PID] < PAYLOAD``.

Why a subprocess per point (as timm's ``bulk_runner`` and optimum-benchmark do): the peak RSS of
a fresh process belongs to this model alone, no allocator cache or thread pool state carries
over from the previous method, and a crash or OOM loses one point, not the sweep.

The parent hands everything to the child through its stdin pipe, never through the disk: one JSON line (the
run's ``measure`` section as :func:`lwbench.options.to_dict` writes it, rebuilt by :func:`lwbench.options.build`,
the device and threads, and the ``--plugin`` files the parent loaded, which the child loads too, so a plugin's
model classes unpickle), then one ``torch.save`` of the whole module and the image batch. The child loads them
(``weights_only=False``: we wrote them ourselves) and frees the bytes, measures memory first (the first full-size
forward of the process), then latency and throughput, and prints one JSON line on stdout. Anything else the model
prints goes to stderr. So a ``kill -9`` of either process leaves no file behind: the pipe goes with them.

A parent killed with ``kill -9`` runs no cleanup, so the child sees to its own end: on Linux the kernel
sends it SIGKILL when the parent dies (``PR_SET_PDEATHSIG``), and everywhere a thread polls the parent's
pid every 0.5 s. Versions before the pipe passed the model in a temporary folder ``lwbench-measure-*``;
:func:`remove_stale_folders` (run by every measurement) removes those whose owner is dead.

This module imports torch only once the parent watch is in place: importing it takes seconds, during
which an orphaned child would otherwise keep running.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lwbench.config import DTYPES, MeasureConfig  # no torch: the parent watch starts before torch loads
from lwbench.options import build, to_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

TEMP_PREFIX = "lwbench-measure-"  # the folders of older versions (see remove_stale_folders)
OWNER = "owner.pid"


def _dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        from lwbench.errors import ConfigError

        raise ConfigError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _options_json(measure: MeasureConfig, device: str | torch.device, threads: int) -> str:
    """The first line the worker reads: the ``measure`` section (as :func:`lwbench.options.to_dict` writes it), the
    device and threads it runs on, and the plugin files this process loaded (a plugin's model classes live in
    modules only those files define: the worker imports them before it unpickles the model)."""
    from lwbench.registry import plugin_files

    return json.dumps({"device": str(device), "threads": int(threads), "measure": to_dict(measure),
                       "plugins": plugin_files()})


def _read_options(line: str) -> tuple[MeasureConfig, str, int, list[str]]:
    """The worker's side of :func:`_options_json`: the section rebuilt and checked by :func:`lwbench.options.build`,
    so the child measures with exactly the typed values the parent had."""
    data = json.loads(line)
    return (build(MeasureConfig, data["measure"], where="measure"), str(data["device"]), int(data["threads"]),
            [str(p) for p in data.get("plugins", [])])


def measure_all(model: nn.Module, images: torch.Tensor, measure: MeasureConfig | None = None, *,
                device: str | torch.device = "cpu", threads: int = 1,
                reference: nn.Module | None = None) -> dict[str, Any]:
    """Memory, then latency (batch 1), then throughput, in this process. The model is put in eval
    mode, cast to ``dtype`` and moved to ``device`` (in place). Latency takes at least ``min_runs``
    measurements, throughput at least ``min(min_runs, 5)``, each at least ``min_run_time`` seconds.

    With a ``reference`` (the run's ``full``) and ``measure.paired``, latency and throughput are timed against
    it, interleaved (:func:`lwbench.measure.paired.measure_paired`), and the result carries the speed-ups with
    their intervals and the attention kernels that ran. Memory is always the model's alone, measured first.

    The protocol is the run's ``measure`` section (default: :class:`~lwbench.config.MeasureConfig`'s defaults);
    ``device`` and ``threads`` (intra-op threads on CPU) are where it runs, which that section does not say."""
    import torch

    from lwbench.measure.latency import as_device, measure_latency, measure_throughput
    from lwbench.measure.memory import measure_memory
    from lwbench.openmp import wait_policy

    o = measure if measure is not None else MeasureConfig()
    threads = int(threads)
    dev = as_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    model = model.eval().to(device=dev, dtype=_dtype(o.dtype))
    out: dict[str, Any] = {"device": dev.type, "threads": threads, "dtype": o.dtype,
                           "omp_wait_policy": wait_policy()}
    out.update(measure_memory(model, images, dev, batch_size=o.memory_batch))
    if reference is not None and o.paired:
        from lwbench.measure.paired import measure_paired

        reference = reference.eval().to(device=dev, dtype=_dtype(o.dtype))  # after the model's memory pass
        if o.compile != "none":
            model, out["compile_time_s"] = _compiled(model, images, dev, o)
            reference, _ = _compiled(reference, images, dev, o)
        cast = images.to(_dtype(o.dtype)) if images.is_floating_point() else images
        out.update(measure_paired(model, reference, cast, dev, threads=threads, warmup=o.warmup,
                                  min_run_time=o.min_run_time, min_runs=o.min_runs, max_run_time=o.max_run_time,
                                  throughput_batch=o.throughput_batch, batches=o.batches))
        return out
    if o.compile != "none":  # after the memory pass: compiling's own allocations are not the model's
        model, out["compile_time_s"] = _compiled(model, images, dev, o)
    kw = dict(threads=threads, warmup=o.warmup, min_run_time=o.min_run_time)
    out.update(measure_latency(model, images, dev, min_runs=o.min_runs, **kw))
    # A big batch on CPU takes seconds per call: a median of 5 calls is enough there.
    out.update(measure_throughput(model, images, dev, batch_size=o.throughput_batch, min_runs=min(o.min_runs, 5),
                                  **kw))
    return out


def _compiled(model: nn.Module, images: torch.Tensor, dev: torch.device, o: MeasureConfig):
    """``torch.compile(model, mode=o.compile)``, compiled for every timed input by untimed calls: each image at
    batch 1 (content-adaptive methods, ATS, ALGM, threshold DynamicViT, LookWhere, change their token counts from
    image to image, and each new count can recompile) and the throughput batch, so that no timed call (nor the
    warm-up that sizes the timing) pays for compiling. Returns the model and the seconds compiling took."""
    import torch

    from lwbench.logs import silence_cuda_home_notice
    from lwbench.measure.latency import _fill_batch

    silence_cuda_home_notice()  # compiling imports torch.utils.cpp_extension
    compiled = torch.compile(model, mode=None if o.compile == "default" else o.compile)
    t0 = time.perf_counter()
    x = images.to(dev, _dtype(o.dtype))
    with torch.inference_mode():
        for i in range(x.shape[0]):  # the slices latency times, one by one
            compiled(x[i: i + 1])
        compiled(_fill_batch(x, o.throughput_batch))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return compiled, time.perf_counter() - t0


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)  # OMP_WAIT_POLICY included: timed passive like the parent (lwbench/openmp.py)
    # Whatever the parent can import (a plugin's model classes), the child must be able to unpickle.
    paths = [p for p in sys.path if p] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(int(threads))
    return env


def _parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("worker printed no JSON result line")


# -- orphans: the worker dies with its parent, and the parent clears what killed parents left ----------------
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, counts as dead). Always True on
    Windows, where ``os.kill(pid, 0)`` would send CTRL_C_EVENT instead of probing."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): alive as far as we can tell
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _die_with_parent(parent_pid: int) -> None:
    """In the worker: exit when ``parent_pid`` is gone (PR_SET_PDEATHSIG on Linux, plus a polling thread)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the thread below still notices
    # The parent may have died before prctl took effect (its death signal is then never sent).
    if os.getppid() != parent_pid and not pid_alive(parent_pid):
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if not pid_alive(parent_pid):
                os._exit(3)

    threading.Thread(target=watch, name="lwbench-parent-watch", daemon=True).start()


def remove_stale_folders(tmpdir: str | Path | None = None, min_age_s: float = 0.0) -> list[Path]:
    """Delete ``lwbench-measure-*`` folders in ``tmpdir`` (default ``tempfile.gettempdir()``) whose owner
    process is dead (and which are older than ``min_age_s``): the pickled models that versions before the
    stdin pipe left when killed mid-way. A folder's owner wrote ``owner.pid`` right after creating it, so a
    folder without one is left alone (possibly being created). Returns the folders removed."""
    removed = []
    for folder in Path(tmpdir or tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            owner = int((folder / OWNER).read_text().strip())
            age = time.time() - folder.stat().st_mtime
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or age < min_age_s or pid_alive(owner):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def measure_in_subprocess(model: nn.Module, images: torch.Tensor, measure: MeasureConfig | None = None, *,
                          device: str | torch.device = "cpu", threads: int = 1, reference: nn.Module | None = None,
                          timeout: float | None = 3600.0) -> dict[str, Any]:
    """:func:`measure_all` in a fresh process; ``"isolated": True`` in the result when it worked.

    Settings as for :func:`measure_all`; the worker gets them as one JSON line. When the
    model cannot be pickled or the worker fails (e.g. a class defined in ``__main__``), the measurement is
    repeated in this process, a warning is logged, and the result says ``"isolated": False`` with the
    reason in ``"isolation_error"`` (its peak memory then includes this process's history, see
    :mod:`lwbench.measure.memory`).
    """
    import torch

    measure = measure if measure is not None else MeasureConfig()
    remove_stale_folders()
    error: str
    payload = io.BytesIO()
    try:
        payload.write(_options_json(measure, device, threads).encode() + b"\n")
        torch.save((model, reference, images.detach().cpu()), payload)  # an unpicklable model fails here
        cmd = [sys.executable, "-m", "lwbench.measure.worker", "--parent-pid", str(os.getpid())]
        proc = subprocess.run(cmd, input=payload.getbuffer(), capture_output=True, timeout=timeout,
                              env=_child_env(threads))
        stdout, stderr = (proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
        if proc.returncode == 0:
            result = _parse_result(stdout)
            result["isolated"] = True
            return result
        tail = (stderr.strip().splitlines() or ["(no stderr)"])[-1]
        error = f"worker exited with code {proc.returncode}: {tail}"
    except subprocess.TimeoutExpired:
        error = f"worker timed out after {timeout} s"
    except Exception as exc:  # pickling, spawning, parsing
        error = f"{type(exc).__name__}: {exc}"
    del payload  # the model's bytes: not kept while it is measured here
    logging.getLogger("lwbench").warning("isolated measurement failed (%s); measuring in this process instead "
                                         "(the row says measure_isolated: false)", error)
    result = measure_all(model, images, measure, device=device, threads=threads, reference=reference)
    result["isolated"] = False
    result["isolation_error"] = error
    result["memory_exact"] = False  # this process's allocator already holds memory from earlier work
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lwbench.measure.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--parent-pid", type=int, default=None, help="exit as soon as this process is gone")
    args = ap.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    stdin = sys.stdin.buffer
    measure, device, threads, plugins = _read_options(stdin.readline().decode())

    import torch

    torch.set_num_threads(threads)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        import lwbench.backbones  # noqa: F401  (registers lw_vit_* so pickled timm models resolve)
        from lwbench.registry import METHODS

        for path in plugins:  # the same module names as in the parent: its pickled plugin classes resolve
            METHODS.load_module(path)

        payload = io.BytesIO(stdin.read())  # torch.load needs to seek: the whole payload, freed once loaded
        model, reference, images = torch.load(payload, map_location="cpu", weights_only=False)
        del payload
        result = measure_all(model, images, measure, device=device, threads=threads, reference=reference)
        result["pid"] = os.getpid()
    print(json.dumps(result), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
