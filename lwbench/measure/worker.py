"""Measure one model in a fresh Python process: ``python -m lwbench.measure.worker DIR [options]``.

Why a subprocess per point (as timm's ``bulk_runner`` and optimum-benchmark do): the peak RSS of
a fresh process belongs to this model alone, no allocator cache or thread pool state carries
over from the previous method, and a crash or OOM loses one point, not the sweep.

The parent pickles the whole module (``torch.save``) and the image batch into a temporary
directory; the child loads them (``weights_only=False``: we wrote the file ourselves), measures
memory first (the first full-size forward of the process), then latency and throughput, and
prints one JSON line on stdout. Anything else the model prints goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        from lwbench.errors import ConfigError

        raise ConfigError(f"unknown dtype '{name}'; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def measure_all(
    model: nn.Module,
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    threads: int = 1,
    throughput_batch: int = 32,
    warmup: int = 10,
    min_run_time: float = 2.0,
    min_runs: int = 10,
    dtype: str = "float32",
    memory_batch: int = 1,
) -> dict[str, Any]:
    """Memory, then latency (batch 1), then throughput, in this process. The model is put in eval
    mode, cast to ``dtype`` and moved to ``device`` (in place). Latency takes at least ``min_runs``
    measurements, throughput at least ``min(min_runs, 5)``, each at least ``min_run_time`` seconds."""
    from lwbench.measure.latency import as_device, measure_latency, measure_throughput
    from lwbench.measure.memory import measure_memory

    device = as_device(device)
    if device.type == "cpu":
        torch.set_num_threads(int(threads))
    model = model.eval().to(device=device, dtype=_dtype(dtype))
    out: dict[str, Any] = {"device": device.type, "threads": int(threads), "dtype": dtype}
    out.update(measure_memory(model, images, device, batch_size=memory_batch))
    kw = dict(threads=threads, warmup=warmup, min_run_time=min_run_time)
    out.update(measure_latency(model, images, device, min_runs=min_runs, **kw))
    # A big batch on CPU takes seconds per call: a median of 5 calls is enough there.
    out.update(measure_throughput(model, images, device, batch_size=throughput_batch, min_runs=min(min_runs, 5), **kw))
    return out


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
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


def measure_in_subprocess(
    model: nn.Module,
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    threads: int = 1,
    throughput_batch: int = 32,
    warmup: int = 10,
    min_run_time: float = 2.0,
    min_runs: int = 10,
    dtype: str = "float32",
    memory_batch: int = 1,
    timeout: float | None = 3600.0,
) -> dict[str, Any]:
    """:func:`measure_all` in a fresh process; ``"isolated": True`` in the result when it worked.

    When the model cannot be pickled or the worker fails (e.g. a class defined in ``__main__``),
    the measurement is repeated in this process, a notice goes to stderr, and the result says
    ``"isolated": False`` with the reason in ``"isolation_error"`` (its peak memory then includes
    this process's history, see :mod:`lwbench.measure.memory`).
    """
    opts = dict(device=str(device), threads=int(threads), throughput_batch=int(throughput_batch), warmup=int(warmup),
                min_run_time=float(min_run_time), min_runs=int(min_runs), dtype=dtype, memory_batch=int(memory_batch))
    error: str
    with tempfile.TemporaryDirectory(prefix="lwbench-measure-") as tmp:
        try:
            torch.save(model, Path(tmp) / "model.pt")
            torch.save(images.detach().cpu(), Path(tmp) / "images.pt")
            cmd = [sys.executable, "-m", "lwbench.measure.worker", tmp]
            for k, v in opts.items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(threads))
            if proc.returncode == 0:
                result = _parse_result(proc.stdout)
                result["isolated"] = True
                return result
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            error = f"worker exited with code {proc.returncode}: {tail}"
        except subprocess.TimeoutExpired:
            error = f"worker timed out after {timeout} s"
        except Exception as exc:  # pickling, spawning, parsing
            error = f"{type(exc).__name__}: {exc}"
    print(f"lwbench: notice: isolated measurement failed ({error}); measuring in this process instead",
          file=sys.stderr)
    result = measure_all(model, images, **opts)
    result["isolated"] = False
    result["isolation_error"] = error
    result["memory_exact"] = False  # this process's allocator already holds memory from earlier work
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lwbench.measure.worker", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="folder with model.pt (torch.save of the module) and images.pt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--throughput-batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--min-runs", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    ap.add_argument("--memory-batch", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        import lwbench.backbones  # noqa: F401  (registers lw_vit_* so pickled timm models resolve)

        model = torch.load(Path(args.dir) / "model.pt", map_location="cpu", weights_only=False)
        images = torch.load(Path(args.dir) / "images.pt", map_location="cpu", weights_only=True)
        result = measure_all(model, images, device=args.device, threads=args.threads,
                             throughput_batch=args.throughput_batch, warmup=args.warmup,
                             min_run_time=args.min_run_time, min_runs=args.min_runs, dtype=args.dtype,
                             memory_batch=args.memory_batch)
        result["pid"] = os.getpid()
    print(json.dumps(result), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
