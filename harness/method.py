"""The plugin contract every multi-bit method implements (see ``docs/plugins.md``).

The harness calls, in order: ``build`` -> ``param_groups`` -> ``prepare`` (a timed phase of its own) ->
per epoch ``epoch_indices`` -> per step ``train_step`` (the method runs forward/backward; the harness zeroes
the gradients before and steps the optimizers after) -> ``finalize`` (a timed phase) -> ``set_bits`` and
evaluation per bit-width -> ``storage`` / ``storage_total``. ``cli.py export`` writes ``export_tensors`` /
``export_tensors_total`` (their payload is what ``storage`` / ``storage_total`` count) and its loader calls
``load_exported`` / ``load_exported_total`` (:mod:`harness.export`). Everything else (data, schedule, seeds, timing,
records) belongs to the harness, so two methods differ only in their quantization semantics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from harness.cost import storage_bits_of, storage_bits_total_of
from harness.errors import ConfigError
from harness.method_config import MethodConfig


@dataclass
class Batch:
    """One training step's data: a common batch, and optionally one batch per bit-width (per-bit sampling)."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    per_bits: dict[int, Batch] | None = None

    def for_bits(self, bits: int) -> Batch:
        """The batch bit-width ``bits`` trains on (its own if the method samples per bit-width)."""
        if self.per_bits is None:
            return self
        return self.per_bits[bits]


@dataclass
class RunContext:
    """What the harness tells a method during a run, and where the method reports sample-passes."""

    bits: tuple[int, ...]
    device: torch.device
    num_classes: int
    seed: int
    epochs: int
    epoch: int = 0
    step: int = 0
    passes: Counter = field(default_factory=Counter)
    data_info: Any = None
    schedule: Any = None
    show_progress: bool = False
    eval_bits: tuple[int, ...] = ()
    #: DataLoader processes for folder data sets (``RunSpec.workers``); pass it on to ``epoch_batches``
    workers: int = 0
    #: saves a checkpoint of the prepare phase so far (the method's ``state_dict`` holds its progress); a resumed
    #: run calls ``prepare`` again, which continues from that state. A no-op without a run folder.
    checkpoint_prepare: Callable[[], None] = field(default=lambda: None, repr=False)

    def count_passes(self, bits: int, samples: int) -> None:
        """Record ``samples`` forward+backward sample-passes at ``bits`` (machine-independent cost)."""
        self.passes[int(bits)] += int(samples)


class Method:
    """Base class of a multi-bit method. Subclasses set ``Config`` and implement ``build`` and ``train_step``."""

    name: ClassVar[str] = "method"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: model names this method can build (``None``: any model of :mod:`harness.models`)
    supported_models: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, cfg: MethodConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()
        if not isinstance(self.cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.cfg).__name__}")

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Method:
        """The method configured from ``KEY=VALUE`` strings; a config that rejects them (any ``ValueError``,
        ``TypeError`` or ``AssertionError`` of a plugin's ``__post_init__``) is one ConfigError naming the method."""
        try:
            cfg = cls.Config.from_options(dict(options))
        except ConfigError:
            raise
        except (ValueError, TypeError, AssertionError) as exc:
            raise ConfigError(f"method {cls.name!r} ({cls.__module__}) rejected its options: "
                              f"{type(exc).__name__}: {exc}") from exc
        return cls(cfg)

    def check_model(self, model_name: str) -> None:
        """Raise :class:`ConfigError` if this method cannot build ``model_name``."""
        if self.supported_models is not None and model_name not in self.supported_models:
            raise ConfigError(f"{self.name} does not support model {model_name!r}; it supports: "
                              f"{', '.join(self.supported_models)}")

    def check_bits(self, bits: tuple[int, ...]) -> None:
        """Raise :class:`harness.errors.ConfigError` if this method cannot serve the bit-width set ``bits``
        (checked before any output is written)."""

    def check_eval_bits(self, bits: tuple[int, ...], eval_bits: tuple[int, ...]) -> None:
        """Raise :class:`ConfigError` if the model trained for ``bits`` cannot be evaluated at ``eval_bits``.
        Default: only trained bit-widths (methods that calibrate in ``finalize`` may allow more)."""
        untrained = sorted(set(eval_bits) - set(bits))
        if untrained:
            raise ConfigError(f"{self.name} cannot evaluate bit-widths it did not train: {untrained} "
                              f"(trained: {list(bits)})")

    def regime_notes(self, schedule: Any, bits: tuple[int, ...], train_size: int) -> list[str]:
        """Reasons why ``schedule`` on ``train_size`` samples is outside the regime this method is meant for
        (printed under the table); none by default."""
        return []

    # -- building ---------------------------------------------------------------------------------------------
    def build(self, model_name: str, num_classes: int, bits: tuple[int, ...], data_info: Any,
              width: float) -> nn.Module:
        """Return the trainable network that serves every bit-width in ``bits``."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Optional parameter groups. Each dict has ``params`` and may set ``lr`` (base lr of the group,
        scaled by the shared lr schedule), ``weight_decay`` and ``optimizer`` ("sgd"/"adam"/"adamw").
        ``None``: one group with the schedule's settings."""
        return None

    # -- phases ---------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, train_set: Any, ctx: RunContext) -> None:
        """Work before training (timed as the ``prepare`` phase), e.g. a scoring run."""

    def before_epoch(self, model: nn.Module, epoch: int, train_set: Any, ctx: RunContext) -> None:
        """Work before training epoch ``epoch`` (timed as the ``prepare`` phase), e.g. EMQ's re-scoring. It must
        depend only on the model and the method's checkpointed state, so that a resumed run repeats it exactly."""

    def epoch_indices(self, epoch: int, train_set: Any, bits: tuple[int, ...]) -> dict[int, torch.Tensor] | None:
        """Which training samples each bit-width sees this epoch; ``None``: every sample, shared by all."""
        return None

    def train_step(self, model: nn.Module, batch: Batch, ctx: RunContext) -> dict[str, float]:
        """Forward and backward for the bit-widths this method trains on ``batch``; return named losses."""
        raise NotImplementedError

    def finalize(self, model: nn.Module, train_batches: Iterator[Batch], ctx: RunContext) -> None:
        """Work after training (timed as the ``finalize`` phase), e.g. BN calibration."""

    # -- deployment -------------------------------------------------------------------------------------------
    def set_bits(self, model: nn.Module, bits: int) -> None:
        """Switch ``model`` to ``bits`` for evaluation; stateless and idempotent."""
        from methods.quant.modules import set_model_bits

        set_model_bits(model, bits)

    def storage(self, model: nn.Module, bits: int) -> int:
        """Bytes to store for deployment at ``bits``: counted by :mod:`harness.cost`, equal to the tensor payload
        :meth:`export_tensors` writes (:mod:`harness.export`)."""
        return storage_bits_of(model, bits) // 8

    def storage_total(self, model: nn.Module, bits: tuple[int, ...]) -> int:
        """Bytes to store to serve every bit-width in ``bits`` from one artifact."""
        return storage_bits_total_of(model, bits) // 8

    # -- export (harness.export: the artifact whose payload ``storage`` / ``storage_total`` count) ---------------------
    def export_tensors(self, model: nn.Module, bits: int) -> dict[str, Any]:
        """The tensors deploying ``model`` at ``bits`` stores (name -> float tensor or ``harness.export.Codes``)."""
        from harness.export import export_model

        return export_model(model, bits)

    def export_tensors_total(self, model: nn.Module, bits: tuple[int, ...]) -> dict[str, Any]:
        """The tensors serving every bit-width in ``bits`` from one artifact."""
        from harness.export import export_model_total

        return export_model_total(model, bits)

    def load_exported(self, model: nn.Module, tensors: dict[str, torch.Tensor], bits: int) -> None:
        """Make a freshly built ``model`` serve ``bits`` from what :meth:`export_tensors` wrote (codes unpacked)."""
        from harness.export import load_model

        load_model(model, tensors, bits)

    def load_exported_total(self, model: nn.Module, tensors: dict[str, torch.Tensor], bits: tuple[int, ...]) -> None:
        """Make a freshly built ``model`` serve every bit-width in ``bits`` from :meth:`export_tensors_total`'s."""
        from harness.export import load_model_total

        load_model_total(model, tensors, bits)

    # -- resumable state ------------------------------------------------------------------------------------
    def resume_note(self) -> str | None:
        """Where an interrupted prepare phase resumes (e.g. "resuming scoring at 4-bit epoch 3"), after
        ``load_state_dict``; None: it restarts."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State the method keeps outside the model (e.g. scores), saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def artifacts(self) -> dict[str, Any]:
        """Tensors worth inspecting (e.g. importance scores, coreset indices); the harness saves them as
        ``artifacts.pt`` in the cell folder after ``prepare`` and after every epoch."""
        return {}
