"""The ``lwbench`` command trains and times with OpenMP's passive wait policy (``lwbench/openmp.py``; measured in
``benchmarks/contention.py`` and ``benchmarks/latency_stability.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def _python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_command_sets_passive_before_torch_loads_and_keeps_a_users_choice():
    code = """
        import os, sys
        from lwbench.cli import main
        assert "torch" not in sys.modules  # importing the CLI loads no torch: the policy can still take effect
        main(["list", "tasks"])
        assert "torch" in sys.modules  # loaded by the command, after it chose the policy
        print("POLICY", os.environ.get("OMP_WAIT_POLICY"))
    """
    assert _python(code).splitlines()[-1] == "POLICY PASSIVE"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE").splitlines()[-1] == "POLICY ACTIVE"


def test_too_late_once_torch_is_loaded():
    code = """
        import torch, os
        from lwbench.openmp import prefer_passive
        print(prefer_passive(), os.environ.get("OMP_WAIT_POLICY"))
    """
    assert _python(code) == "False None"


def test_the_row_records_the_timing_process_policy():
    code = """
        import torch
        from lwbench.config import MeasureConfig
        from lwbench.measure.worker import measure_in_subprocess
        quick = MeasureConfig(throughput_batch=2, warmup=1, min_run_time=0.02, min_runs=2)
        r = measure_in_subprocess(torch.nn.Linear(4, 2), torch.rand(2, 4), quick, threads=1)
        print(r["isolated"], r["omp_wait_policy"])
    """
    assert _python(code, OMP_WAIT_POLICY="PASSIVE") == "True PASSIVE"  # the worker inherits the policy
    assert _python(code) == "True default"
