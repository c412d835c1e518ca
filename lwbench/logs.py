"""lwbench's log: every notice, warning and progress line goes through ``logging.getLogger("lwbench")``.

Library users configure it like any logger; the CLI (and :func:`lwbench.run`) call :func:`setup`, which
prints ``lwbench: <message>`` (``lwbench: warning: ...`` for warnings) on stderr, and ``--quiet`` raises
the level to warnings, so every notice honours it while a warning that explains a result still shows.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("lwbench")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"lwbench: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"lwbench: warning: {msg}"
        return f"lwbench: {msg}"


def setup(quiet: bool = False) -> None:
    """One stderr handler on the ``lwbench`` logger (idempotent); level INFO, or WARNING when ``quiet``."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Format())
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


setup()  # a tool first: notices reach stderr even when lwbench is used from Python (lwbench.run sets quiet)


def is_quiet() -> bool:
    return not log.isEnabledFor(logging.INFO)


class _NoCudaRuntimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def silence_cuda_home_notice() -> None:
    """Drop the one line ``torch.utils.cpp_extension`` logs when imported on a machine with a CUDA toolkit but no
    usable GPU ("No CUDA runtime is found, using CUDA_HOME=..."): ``torch.utils.benchmark`` and ``torch.compile``
    import it, so every CPU timing process printed it. Its other messages pass. Idempotent."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


__all__ = ["log", "setup", "is_quiet", "silence_cuda_home_notice"]
