"""Errors that the command line turns into a one-line message and an exit code (``exit_code``).

Exit code 2: the input (a field, a file, a run directory) needs the user's decision; every such error
names the field or file, the value and what is allowed, so a user can fix the input without reading the
code. Exit code 1: the environment failed (a full disk, an unreachable tracking store).
"""

from __future__ import annotations


class MaskConnectError(Exception):
    """Base class: a user-facing problem (bad input, missing data). The CLI exits with code 2."""

    exit_code = 2


class ConfigError(MaskConnectError, ValueError):
    """A configuration field has a value that is not allowed."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"invalid {field}={value!r}: {allowed}")


class DataError(MaskConnectError, RuntimeError):
    """A dataset is missing, corrupted or unreadable."""


class RunDirError(MaskConnectError, RuntimeError):
    """An output directory holds something that would be lost or mixed up by this run."""


class TrainingDiverged(MaskConnectError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class StorageError(MaskConnectError, OSError):
    """A file could not be written (disk full, quota, read-only file system). The environment failed,
    not the input: exit code 1. Nothing half-written is left (io's atomic writes)."""

    exit_code = 1


class TrackingError(MaskConnectError, RuntimeError):
    """The MLflow store cannot be used (``maskconnect track``; training only warns). Exit code 1."""

    exit_code = 1


class ReportWarning(UserWarning):
    """Something a reader of the report must know that does not stop it (no complete run found); the CLI
    prints it as one line."""
