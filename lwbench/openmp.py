"""OpenMP's wait policy for lwbench's processes: passive while training, the OpenMP default while timing.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the PyPI wheels), whose worker threads spin at every barrier
before they sleep. Alone on the machine that spinning saves a wake-up; beside other busy processes it burns the
share of the cores the step needed, because a spinning thread waits for a partner that the scheduler has taken off
its core. Measured with ``python benchmarks/contention.py`` (quick traffic-signs teacher, 2 threads on 2 cores,
``benchmarks/results/contention.md``, two runs): beside two busy loops a training step slowed 3.0-3.3x with the
default policy where its fair share of the cores predicts 2.0x, and 1.9x with ``OMP_WAIT_POLICY=PASSIVE``; beside
two PyTorch processes 5.3-13.9x against a fair 3.0x, and 3.4-3.8x passive. On the quiet machine passive was no
slower (0.81-0.83 against 0.82-0.86 s/step). Training is where lwbench spends its hours, so the ``lwbench`` command
trains passive.

Timing is not: at batch 1 the tiny quick models run many short parallel regions, and passive waiting made them
10-20% slower on the quiet machine (``full`` 8.5 -> 9.3 ms), with the ratio between two models unchanged. The
isolated timing worker therefore gets OpenMP's default back, unless the user chose a policy, and every row
records the policy its timing ran under (``omp_wait_policy``).

libgomp reads the variable once, when torch is imported, so :func:`prefer_passive` must run before that (the CLI
calls it first thing); it does nothing when torch is already loaded or the user set the variable.
"""

from __future__ import annotations

import os
import sys

VAR = "OMP_WAIT_POLICY"
_SET_BY_LWBENCH = "LWBENCH_SET_OMP_WAIT_POLICY"


def prefer_passive() -> bool:
    """Make this process (and the processes it starts) wait passively, unless the user set a policy or torch is
    already imported (too late to take effect). Returns whether it set it."""
    if VAR in os.environ or "torch" in sys.modules:
        return False
    os.environ[VAR] = "PASSIVE"
    os.environ[_SET_BY_LWBENCH] = "1"
    return True


def timing_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a timing process: OpenMP's default policy again where lwbench (not the user) chose passive."""
    env = dict(env)
    if env.pop(_SET_BY_LWBENCH, None):
        env.pop(VAR, None)
    return env


def wait_policy() -> str:
    """The policy this process's OpenMP runs under, as the row records it (``default`` when unset)."""
    return os.environ.get(VAR) or "default"


__all__ = ["prefer_passive", "timing_env", "wait_policy", "VAR"]
