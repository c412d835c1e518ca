"""OpenMP's wait policy for lwbench's processes: passive, for training and timing alike.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the PyPI wheels), whose worker threads spin at every barrier
before they sleep. Alone on the machine that spinning saves a wake-up; beside other busy processes it burns the
share of the cores the step needed, because a spinning thread waits for a partner that the scheduler has taken off
its core. Measured with ``python benchmarks/contention.py`` (quick traffic-signs teacher, 2 threads on 2 cores,
``benchmarks/results/contention.md``, two runs): beside two busy loops a training step slowed 3.0-3.3x with the
default policy where its fair share of the cores predicts 2.0x, and 1.9x with ``OMP_WAIT_POLICY=PASSIVE``; beside
two PyTorch processes 5.3-13.9x against a fair 3.0x, and 3.4-3.8x passive. On the quiet machine passive was no
slower (0.81-0.83 against 0.82-0.86 s/step).

Timing suffers the same way, worse: beside two busy loops, timing workers under the default policy fell into
calls of ~580 ms for models that take 9 ms (one model per process, the old protocol's speed-ups then ranged from
0.04x to 38x; paired timings of tome and evit stuck near 1 in the same regime), and throughput speed-ups moved
from 1.2 to 0.67; passive, the throughput speed-ups held (lookwhere 2.78 -> 2.85, tome 1.10 -> 1.13, evit 1.28 ->
1.30; ``benchmarks/results/latency_stability.md``). The price is batch 1 on a quiet machine: the tiny quick models'
short parallel regions wake sleeping threads, 10-20% slower (``full`` 8.5 -> 9.3 ms) with the ratio between two
models unchanged (1.50 and 1.47). lwbench leads with ratios, so its timing worker inherits the passive policy too,
and every row records the policy it was timed under (``omp_wait_policy``).

libgomp reads the variable once, when torch is imported, so :func:`prefer_passive` must run before that (the CLI
calls it first thing); it does nothing when torch is already loaded or the user set the variable (a user's own
choice, ``OMP_WAIT_POLICY=ACTIVE`` included, is kept and recorded).
"""

from __future__ import annotations

import os
import sys

VAR = "OMP_WAIT_POLICY"


def prefer_passive() -> bool:
    """Make this process (and the processes it starts) wait passively, unless the user set a policy or torch is
    already imported (too late to take effect). Returns whether it set it."""
    if VAR in os.environ or "torch" in sys.modules:
        return False
    os.environ[VAR] = "PASSIVE"
    return True


def wait_policy() -> str:
    """The policy this process's OpenMP runs under, as the row records it (``default`` when unset)."""
    return os.environ.get(VAR) or "default"


__all__ = ["prefer_passive", "wait_policy", "VAR"]
