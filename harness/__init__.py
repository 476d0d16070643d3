"""mbqbench harness: data, models, schedule, training loop, evaluation, cost, records and reports."""

from harness.errors import ConfigError, DataError, MbqError, TrainingDiverged

__all__ = ["ConfigError", "DataError", "MbqError", "TrainingDiverged"]
