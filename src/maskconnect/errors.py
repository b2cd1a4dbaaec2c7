"""Errors that the command line turns into a one-line message and exit code 2.

Every error names the field, the value and what is allowed, so a user can fix the input without
reading the code.
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
