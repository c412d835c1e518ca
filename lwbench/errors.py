"""Errors a user can act on.

Every subclass of :class:`LwbenchError` is printed by the CLI as one line (``lwbench: error: ...``,
exit code 2) with no traceback, so the message itself must say what went wrong and how to fix it.
"""

from __future__ import annotations


class LwbenchError(Exception):
    """Base class: an error the user caused or can fix (bad name, bad budget, missing data)."""


class UnknownNameError(LwbenchError, KeyError):
    """A method, task, backbone or profile name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class BudgetError(LwbenchError, ValueError):
    """A budget the model cannot honour (k larger than the grid, r too large, bad image size)."""


class ConfigError(LwbenchError, ValueError):
    """A malformed option, profile or sweep file."""


class DataNotFoundError(LwbenchError, FileNotFoundError):
    """A dataset that is not where ``--data-root`` says, with the expected layout in the message."""


class DataError(LwbenchError, ValueError):
    """A dataset that exists but is malformed: unreadable image, bad annotation, wrong label map."""


class CheckpointError(LwbenchError, ValueError):
    """A checkpoint with missing or mismatched keys, or an architecture that does not fit."""


class TrainingError(LwbenchError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


class DiskFullError(LwbenchError, OSError):
    """The disk holding the cache or the results ran out of space; what was finished is kept."""
