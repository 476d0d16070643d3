"""Frozen, validated, JSON-serializable configuration: the shared ``Schedule`` and a ``RunSpec``.

Method configs derive from ``JsonConfig`` too, in :mod:`harness.method_config`.

Every value is checked in ``__post_init__`` so that a bad option fails before any file is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from harness.errors import ConfigError
from harness.threads import default_loader_workers

MAX_BITS = 32
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "step", "onecycle", "constant")
BUDGET_KINDS = ("sample-passes", "device-hours")
AMP_MODES = ("off", "bf16")
DATA_PLACEMENTS = ("auto", "device", "host")
REFERENCE_METHOD = "fp"  # the full-precision reference (methods/reference.py)
REFERENCES = (REFERENCE_METHOD, "none")


def parse_budget(text: str) -> tuple[str, float]:
    """Parse ``"sample-passes=2e6"`` or ``"device-hours=0.5"`` into (kind, positive amount)."""
    kind, sep, amount = str(text).partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS:
        raise ConfigError(f"--budget must be KIND=AMOUNT with KIND one of {', '.join(BUDGET_KINDS)}, got {text!r}")
    try:
        value = float(amount)
    except ValueError:
        raise ConfigError(f"--budget amount must be a number, got {amount.strip()!r}") from None
    check_positive(f"--budget {kind}", value)
    return kind, value


def parse_bits(text: str) -> tuple[int, ...]:
    """Parse ``"2,4,8,32"``: integers 1..32, no duplicates, at least one; sorted ascending."""
    items = [item.strip() for item in str(text).split(",")]
    if not text or not str(text).strip() or any(item == "" for item in items):
        raise ConfigError(f"bits must be a comma-separated list of integers in 1..{MAX_BITS}, got {text!r}")
    bits: list[int] = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"bit-width {item!r} is not an integer (bits must be in 1..{MAX_BITS})") from None
        bits.append(value)
    return validate_bits(bits)


def validate_bits(bits: typing.Iterable[int]) -> tuple[int, ...]:
    bits = list(bits)
    if not bits:
        raise ConfigError("at least one bit-width is needed")
    for value in bits:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BITS:
            raise ConfigError(f"bit-width {value!r} is out of range: bits must be integers in 1..{MAX_BITS}")
    duplicates = sorted({b for b in bits if bits.count(b) > 1})
    if duplicates:
        raise ConfigError(f"bit-width {duplicates[0]} is listed twice")
    return tuple(sorted(bits))


def flag(field: str) -> str:
    """The command-line flag of a config field (``batch_size`` -> ``--batch-size``)."""
    return "--" + field.replace("_", "-")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")


class JsonConfig:
    """JSON round-trip for frozen dataclasses (tuples become lists in JSON and tuples again on load)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no option {unknown[0]!r}; options: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            values[name] = _revive(hints[name], value)
        return cls(**values)


def _revive(hint: Any, value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict) and isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint.from_dict(value)
    return value


@dataclass(frozen=True)
class Schedule(JsonConfig):
    """The training schedule every method in a comparison shares."""

    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    augment: bool = True
    budget_kind: str | None = None
    budget: float | None = None
    # the named default recipe the optimizer settings came from (harness.recipes); "" when they were set explicitly
    recipe: str = ""

    def __post_init__(self) -> None:
        # Messages name the command-line flags: that is where a user set (or can set) each field.
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"--epochs must be a positive integer, got {self.epochs!r}")
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag(name)} must be a positive integer, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown --lr-schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        check_positive("--lr", self.lr)
        check_positive("--momentum", self.momentum, allow_zero=True)
        if self.momentum >= 1:  # a momentum of 1 or more never forgets a gradient: the steps grow without bound
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        check_positive("--weight-decay", self.weight_decay, allow_zero=True)
        check_positive("--gamma", self.gamma)
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs must be in 0..epochs-1, got {self.warmup_epochs!r}")
        if any(not isinstance(m, int) or not 0 < m < self.epochs for m in self.milestones):
            raise ConfigError(f"--milestones must be epochs in 1..{self.epochs - 1}, got {self.milestones!r}")
        if self.lr_schedule == "step" and not self.milestones:
            raise ConfigError("the step lr schedule needs milestones (e.g. --milestones 100,150)")
        if (self.budget_kind is None) != (self.budget is None):
            raise ConfigError("a budget needs both a kind and an amount (e.g. --budget sample-passes=2e6)")
        if self.budget_kind is not None:
            if self.budget_kind not in BUDGET_KINDS:
                raise ConfigError(f"unknown budget kind {self.budget_kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
            check_positive("budget", self.budget)

    @property
    def max_budget_epochs(self) -> int:
        """Under a budget, training stops with an error if the budget is not spent after this many epochs."""
        return 100 * self.epochs

    def lr_factor(self, epoch: int, index: int, steps_in_epoch: int) -> float:
        """Multiplier of each parameter group's base lr at step ``index`` of ``epoch`` (both 0-based), per iteration.

        Progress is measured in epochs, so a method that runs fewer steps per epoch (a coreset) follows the same
        curve over the same epochs.
        """
        progress_epochs = epoch + index / max(1, steps_in_epoch)
        if progress_epochs < self.warmup_epochs:
            return (epoch * steps_in_epoch + index + 1) / (self.warmup_epochs * steps_in_epoch)
        return self._factor_after_warmup(progress_epochs)

    def lr_factor_at_fraction(self, fraction: float) -> float:
        """The lr multiplier when ``fraction`` of a cost budget is spent: the schedule's curve over ``epochs``
        stretched onto the budget, so every method ends its (annealed) schedule exactly when its budget runs out.
        """
        progress_epochs = min(max(fraction, 0.0), 1.0) * self.epochs
        if progress_epochs < self.warmup_epochs:
            return max(progress_epochs / self.warmup_epochs, 1e-3)
        return self._factor_after_warmup(progress_epochs)

    def _factor_after_warmup(self, progress_epochs: float) -> float:
        if self.lr_schedule == "constant":
            return 1.0
        if self.lr_schedule == "step":
            return self.gamma ** sum(progress_epochs >= m for m in self.milestones)
        progress = (progress_epochs - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        # one-cycle: linear ramp 0.04 -> 1 over the first 30%, then cosine down to 0
        peak = 0.3
        if progress < peak:
            return 0.04 + 0.96 * progress / peak
        return 0.5 * (1.0 + math.cos(math.pi * (progress - peak) / (1 - peak)))


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunSpec(JsonConfig):
    """Everything that defines a comparison: data, model, bit-widths, methods, seeds and the shared schedule.

    ``reference``: "fp" (default) also trains the full-precision network of the same model and schedule once per
    seed, as the table's reference row; "none" skips it. Listing ``fp`` in ``methods`` as well is the same as
    the reference (it is dropped from ``methods``, so it trains once); with ``reference="none"`` it is an error.
    A spec.json written before this field existed loads with the default.

    ``workers``: DataLoader processes that decode folder data sets (0: the training process; default: the
    available CPUs, at most 8). It changes no batch, so it is left out of the spec's JSON (``spec.json``, the run
    folder's hash, the resume check): a run resumed with another ``--workers`` is the same comparison.
    """

    methods: tuple[str, ...]
    dataset: str = "digits"
    model: str = "resnet20"
    width: float = 1.0
    bits: tuple[int, ...] = (2, 4, 8, 32)
    eval_bits: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    schedule: Schedule = field(default_factory=Schedule)
    data_root: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    device: str = "auto"
    baseline: str | None = None
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    data_placement: str = "auto"
    reference: str = REFERENCE_METHOD
    workers: int = field(default_factory=default_loader_workers)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["workers"]  # how fast images are decoded, never which: see the class docstring
        return data

    @property
    def cell_methods(self) -> tuple[str, ...]:
        """The method specs that get one cell per seed: ``methods``, then the reference if there is one."""
        return (*self.methods, REFERENCE_METHOD) if self.reference == REFERENCE_METHOD else self.methods

    @property
    def evaluated_bits(self) -> tuple[int, ...]:
        """The bit-widths evaluated after training (``eval_bits``, default the trained ``bits``)."""
        return self.eval_bits if self.eval_bits is not None else self.bits

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ConfigError(f"unknown --reference {self.reference!r}; choose one of {', '.join(REFERENCES)}")
        listed = [m for m in self.methods if _method_name(m) == REFERENCE_METHOD]
        if any(m.strip() != REFERENCE_METHOD for m in listed):
            raise ConfigError(f"the full-precision reference {REFERENCE_METHOD!r} takes no options, got "
                              f"{next(m for m in listed if m.strip() != REFERENCE_METHOD)!r}")
        if listed and self.reference != REFERENCE_METHOD:
            raise ConfigError(f"--methods lists {REFERENCE_METHOD}, the full-precision reference, but --reference "
                              f"{self.reference} skips it; pass --reference {REFERENCE_METHOD} instead")
        if listed:  # the reference row trains it once per seed already; a second cell would be the same run
            object.__setattr__(self, "methods", tuple(m for m in self.methods if m not in listed))
            if not self.methods:
                raise ConfigError(f"{REFERENCE_METHOD} is the reference row (--reference {REFERENCE_METHOD}); "
                                  f"list at least one method to compare with it")
        if not self.methods:
            raise ConfigError("at least one method is needed (e.g. --methods anyprecision,dedicated)")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("a method spec is listed twice; give each ablation different options")
        object.__setattr__(self, "bits", validate_bits(self.bits))
        if self.eval_bits is not None:
            object.__setattr__(self, "eval_bits", validate_bits(self.eval_bits))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be distinct non-negative integers, got {self.seeds!r}")
        check_positive("--width", self.width)
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{flag(name)} must be a positive integer, got {value!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"unknown --amp mode {self.amp!r}; choose one of {', '.join(AMP_MODES)}")
        if self.data_placement not in DATA_PLACEMENTS:
            raise ConfigError(f"unknown --data-on placement {self.data_placement!r}; "
                              f"choose one of {', '.join(DATA_PLACEMENTS)}")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"--workers must be a non-negative integer (0: decode in the training process), "
                              f"got {self.workers!r}")
        if self.baseline is not None and self.baseline not in self.cell_methods:
            raise ConfigError(f"baseline {self.baseline!r} is not one of the compared methods")


def _method_name(method_spec: str) -> str:
    return str(method_spec).split(":", 1)[0].strip()
