"""EMQ's configuration (every option and its default: see :mod:`methods.emq`), the activation quantizer that
honours ``act_bits``, and the learning rate of its scoring runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from harness.config import check_positive
from harness.errors import ConfigError
from harness.method_config import MethodConfig
from methods.quant.coreset_selectors import get_selector
from methods.quant.dorefa import FULL_PRECISION, dorefa_activation

MIN_SCORE_EPOCHS = 3
# Outside these EMQ's coreset schedule is not the paper's regime (regime_notes): scoring at most a quarter of the
# training passes (the paper: 10 scoring epochs x bit-widths against 200 epochs on 20 %), and enough coreset steps
# per epoch for the temperature-sampled subsets to be trained on rather than glimpsed.
MAX_SCORING_SHARE = 0.25
MIN_CORESET_STEPS = 8


@dataclass(frozen=True)
class EMQConfig(MethodConfig):
    width: float | None = None
    prune: float = 0.8
    tau: float = 0.5
    score_epochs: int | None = None
    score_fraction: float = 0.05
    scoring: Literal["bitwise", "batchwise"] = "bitwise"
    score_lr: Literal["constant", "compressed"] = "constant"
    tdds_window: int | None = None
    tdds_beta: float = 0.9
    sampling: Literal["softmax", "power"] = "softmax"
    resample_every: int = 1
    selector: str = "tdds"
    rescore_every: int | None = None
    bias_correction: Literal["per_layer", "per_channel", "off"] = "per_layer"
    shared_bn: bool = True
    share_binary_bn: bool = False
    shared_bn_grad: Literal["sum", "mean"] = "sum"
    bn_adapt_batches: int = 100
    distill: Literal["none", "recursive"] = "none"
    act_bits: int | None = None
    fp_shortcut: bool = False
    full_precision_act: Literal["relu", "clamp"] = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width is not None:
            check_positive("emq width", self.width)
        if not 0 <= self.prune < 1:
            raise ConfigError(f"emq prune must be in [0, 1), got {self.prune!r}")
        check_positive("emq tau", self.tau)
        # T epochs give T - 1 output changes; a window needs two of them, or its dispersion is 0 for every sample.
        if self.score_epochs is not None and self.score_epochs < MIN_SCORE_EPOCHS:
            raise ConfigError(f"emq score_epochs must be at least 3 (TDDS windows need two output changes), "
                              f"got {self.score_epochs}")
        if not 0 < self.score_fraction <= 1:
            raise ConfigError(f"emq score_fraction must be in (0, 1], got {self.score_fraction!r}")
        if self.tdds_window is not None and self.tdds_window < 2:
            raise ConfigError(f"emq tdds_window must be in 2..score_epochs-1, got {self.tdds_window}")
        if self.tdds_window is not None and self.score_epochs is not None and \
                self.tdds_window > self.score_epochs - 1:
            raise ConfigError(f"emq tdds_window must be in 2..score_epochs-1 = {self.score_epochs - 1}, "
                              f"got {self.tdds_window}")
        if not 0 < self.tdds_beta <= 1:
            raise ConfigError(f"emq tdds_beta must be in (0, 1], got {self.tdds_beta!r}")
        get_selector(self.selector)  # a one-line ConfigError naming the known selectors
        if self.rescore_every is not None and self.rescore_every < 1:
            raise ConfigError(f"emq rescore_every must be a positive integer, got {self.rescore_every}")
        if self.resample_every < 1:
            raise ConfigError(f"emq resample_every must be a positive integer, got {self.resample_every}")
        if self.shared_bn_grad == "mean" and not self.shared_bn:
            raise ConfigError("emq shared_bn_grad=mean needs shared_bn=true (separate BNs are not shared)")
        if self.bn_adapt_batches < 0:
            raise ConfigError(f"emq bn_adapt_batches must be non-negative, got {self.bn_adapt_batches}")
        if self.act_bits is not None and not 1 <= self.act_bits <= FULL_PRECISION:
            raise ConfigError(f"emq act_bits must be in 1..{FULL_PRECISION}, got {self.act_bits}")

    def scoring_epochs(self, epochs: int) -> int:
        """``score_epochs``, or ``score_fraction`` of the schedule's epochs (at least 3): the paper scores 10 of
        200 epochs, so the default keeps that share on any schedule."""
        if self.score_epochs is not None:
            return self.score_epochs
        return max(MIN_SCORE_EPOCHS, round(self.score_fraction * epochs))


def emq_activation(x: torch.Tensor, bits: int, act_bits: int | None, full_precision_act: str) -> torch.Tensor:
    """DoReFa activation at the weight bit-width, or at ``act_bits`` for every weight bit-width below 32."""
    if act_bits is not None and bits < FULL_PRECISION:
        bits = act_bits
    return dorefa_activation(x, bits, full_precision_act)


def scoring_lr_factor(schedule: Any, score_lr: str, epoch: int, index: int, steps: int, score_epochs: int) -> float:
    """The lr multiplier of a scoring run at step ``index`` of scoring epoch ``epoch``."""
    if score_lr == "constant":
        return 1.0
    progress = (epoch + index / max(1, steps)) * schedule.epochs / score_epochs
    main_epoch = min(int(progress), schedule.epochs - 1)
    return schedule.lr_factor(main_epoch, (progress - main_epoch) * steps, steps)
