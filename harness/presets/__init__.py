"""Paper presets: one module per paper table, each a :class:`Preset` with the exact recipe, the published
numbers (``results/published/<name>.csv``, with their source) and a note on every uncertain point.

``python cli.py reproduce NAME`` runs a preset and prints published vs measured numbers with the gap; empty
published cells are shown as unverified, never filled in. A preset may also carry ``claims``
(:class:`harness.claims.Claim`): the paper's checkable statements, each given a verdict on the measured records.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from harness.claims import Claim, check_claims
from harness.config import RunSpec, Schedule
from harness.errors import ConfigError, MbqError

PUBLISHED_DIR = Path(__file__).resolve().parents[2] / "results" / "published"
PUBLISHED_COLUMNS = ["method", "bits", "metric", "value", "source"]
PRESET_SIZES = ("cpu", "full")


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    dataset: str
    model: str
    bits: tuple[int, ...]
    methods: tuple[str, ...]
    schedule: Schedule
    width: float = 1.0
    eval_bits: tuple[int, ...] | None = None
    notes: tuple[str, ...] = ()
    data_needs: str = ""
    speedup_baseline: str | None = None
    claims: tuple[Claim, ...] = ()
    #: seeds when the command line gives none (claim presets: 3, for the bootstrap intervals of their verdicts)
    seeds: tuple[int, ...] = (0,)
    #: "cpu": sized to run on 2 CPU cores in about half an hour; "full": the paper-sized run, for a GPU
    size: str = "full"

    def __post_init__(self) -> None:
        # a claim naming a method the preset does not run could never be decided: fail when the preset loads
        object.__setattr__(self, "claims", check_claims(self.claims, self.methods, self.eval_bits or self.bits))
        if self.size not in PRESET_SIZES:
            raise ConfigError(f"preset {self.name}: size must be one of {', '.join(PRESET_SIZES)}, got {self.size!r}")

    def run_spec(self, *, epochs: int | None = None, seeds: tuple[int, ...] | None = None, data_root: str | None = None,
                 train_subset: int | None = None, test_subset: int | None = None, device: str = "auto",
                 width: float | None = None, **runtime: Any) -> RunSpec:
        """The preset's run; ``epochs`` shortens the schedule, ``width`` overrides the model width (smoke tests);
        ``runtime``: RunSpec's execution fields (amp, channels_last, compile, data_placement)."""
        return RunSpec(methods=self.methods, dataset=self.dataset, model=self.model, width=width or self.width,
                       bits=self.bits, eval_bits=self.eval_bits, seeds=seeds or self.seeds,
                       schedule=shortened(self.schedule, epochs), data_root=data_root, train_subset=train_subset,
                       test_subset=test_subset, device=device, baseline=self.speedup_baseline, **runtime)

    def published(self) -> pd.DataFrame:
        return load_published(PUBLISHED_DIR / f"{self.name}.csv")


def shortened(schedule: Schedule, epochs: int | None) -> Schedule:
    """The same schedule over ``epochs`` epochs: step milestones, warm-up and a cost budget scale proportionally."""
    if epochs is None or epochs == schedule.epochs:
        return schedule
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    scale = epochs / schedule.epochs
    milestones = tuple(sorted({m for m in (max(1, round(m * scale)) for m in schedule.milestones) if m < epochs}))
    lr_schedule = schedule.lr_schedule
    if lr_schedule == "step" and not milestones:
        lr_schedule = "constant"
    warmup = min(int(math.floor(schedule.warmup_epochs * scale)), epochs - 1)
    budget = schedule.budget * scale if schedule.budget is not None else None
    return replace(schedule, epochs=epochs, milestones=milestones, lr_schedule=lr_schedule, warmup_epochs=warmup,
                   budget=budget)


def load_published(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    try:
        frame = pd.read_csv(path, dtype={"method": str, "metric": str, "source": str})
    except (OSError, ValueError) as exc:
        raise MbqError(f"published numbers {path} are unreadable: {exc}") from exc
    missing = set(PUBLISHED_COLUMNS) - set(frame.columns)
    if missing:
        raise MbqError(f"published numbers {path} lack columns {sorted(missing)}")
    frame["bits"] = pd.to_numeric(frame["bits"], errors="coerce").astype("Int64")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame[PUBLISHED_COLUMNS]


_PRESETS: dict[str, Preset] = {}


def _discover() -> None:
    if _PRESETS:
        return
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = (getattr(module, "PRESET", None), *getattr(module, "PRESETS", ()))
        for preset in found:
            if not isinstance(preset, Preset):
                continue
            if preset.name in _PRESETS:
                raise MbqError(f"preset {preset.name!r} is defined twice")
            _PRESETS[preset.name] = preset


def list_presets() -> list[str]:
    _discover()
    return sorted(_PRESETS)


def claim_presets(size: str | None = None) -> list[str]:
    """The presets that carry claims (``reproduce --all-claims`` runs these), optionally of one ``size``."""
    return [name for name in list_presets() if _PRESETS[name].claims and size in (None, _PRESETS[name].size)]


def get_preset(name: str) -> Preset:
    _discover()
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]
