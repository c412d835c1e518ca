from __future__ import annotations

import os

import pytest
import torch

pytest.register_assert_rewrite("_toy")  # its shared checks report like test asserts
from _toy import GRID_5X7_CASES, make  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own cache and results folders: no test sees another's teachers or rows."""
    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LWBENCH_RESULTS", str(tmp_path / "results"))
    from lwbench.logs import setup

    setup(quiet=False)  # a --quiet test must not silence the next one's notices
    yield


@pytest.fixture(scope="module", params=GRID_5X7_CASES, ids=[c[0] for c in GRID_5X7_CASES])
def case(request):
    """``(vit, spec, size)`` on a 5x7 grid for the reduction-method tests (ats, evit, tome), built once per module."""
    name, size = request.param
    vit, spec = make(name, size)
    return vit, spec, size
