from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own cache and results folders: no test sees another's teachers or rows."""
    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LWBENCH_RESULTS", str(tmp_path / "results"))
    yield
