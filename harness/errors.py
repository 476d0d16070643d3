"""User-facing errors: anything the user can fix (bad option, missing data, bad run directory).

The CLI prints these as a single ``error: ...`` line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class MbqError(Exception):
    """A problem the user can fix; its message is one line that says what and how."""


class ConfigError(MbqError, ValueError):
    """An invalid configuration value (schedule, run spec, or method option)."""


class DataError(MbqError):
    """A data set that is missing, incomplete or corrupt."""


class TrainingDiverged(MbqError):
    """The loss became NaN or infinite during training."""
