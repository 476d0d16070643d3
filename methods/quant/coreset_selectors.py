"""Coreset selectors: per-sample scores from a scoring run, for EMQ's temperature sampling (Eq. 3).

EMQ (Kim et al., NeurIPS 2025, arXiv 2510.20673) compares its bit-wise TDDS coresets with other ways of choosing
the training subset at the same pruning rate. Each selector here turns what a scoring run sees into one score per
sample (higher: more likely drawn); EMQ then draws every coreset from those scores with the same temperature
sampling, so the selectors differ only in their scores.

* ``tdds``: Temporal Dual-Depth Scoring (Zhang et al., CVPR 2024), :mod:`methods.quant.coreset`.
* ``el2n``: Paul et al., NeurIPS 2021: ``|| p - onehot(y) ||_2`` of each epoch's softmax, averaged over the
  scoring epochs (the paper averages early-training scores; the scoring run is early training).
* ``entropy``: Coleman et al., ICLR 2020 (selection via proxy): ``-sum_c p_c log p_c`` of the last scoring
  epoch's softmax (``0 log 0 = 0``).
* ``forgetting``: Toneva et al., ICLR 2019: the number of epochs at which a sample that was classified correctly
  at the previous epoch is misclassified; a sample never classified correctly counts as forgotten more often
  than any learned sample can be (score = number of scoring epochs), as the paper ranks unlearned samples first.
* ``moderate``: Xia et al., ICLR 2023 (moderate coreset): in the feature space of the scored network (the
  classifier's input, one evaluation pass over the unaugmented training set after the scoring epochs), each
  sample's distance ``d_i`` to its class centre; score ``-|d_i - median_class(d)|``, so the samples nearest the
  median distance are the likeliest.
* ``random``: no scoring pass; every score is equal, so temperature sampling draws uniformly without replacement.

Third-party selectors register with :func:`register_selector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from methods.quant.coreset import TDDSRecorder


class Selector:
    """Collects a scoring run's outputs and gives one score per sample.

    ``needs_scoring``: whether a scoring run is needed at all; ``needs_features``: whether :meth:`add_features`
    must be called with the network's features after the scoring epochs.
    """

    name: ClassVar[str] = "selector"
    needs_scoring: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False

    def __init__(self, num_samples: int, *, tdds_window: int | None = None, tdds_beta: float = 0.9) -> None:
        self.num_samples = num_samples

    def add_epoch(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        """One scoring epoch's softmax outputs ``(N, C)`` (row ``i`` = sample ``i``) and labels ``(N,)``."""

    def add_features(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Features ``(N, D)`` of every training sample after the scoring epochs (``needs_features`` only)."""

    def scores(self) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the selector has collected (tensors and plain data), for a checkpoint taken during scoring."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


SELECTORS: dict[str, type[Selector]] = {}


def register_selector(name: str) -> Callable[[type[Selector]], type[Selector]]:
    def decorate(cls: type[Selector]) -> type[Selector]:
        cls.name = name
        SELECTORS[name] = cls
        return cls
    return decorate


def get_selector(name: str) -> type[Selector]:
    if name not in SELECTORS:
        raise ConfigError(f"unknown coreset selector {name!r}; known: {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name]


@register_selector("tdds")
class TDDSSelector(Selector):
    def __init__(self, num_samples: int, *, tdds_window: int | None = None, tdds_beta: float = 0.9) -> None:
        super().__init__(num_samples)
        self.recorder, self.window, self.beta = TDDSRecorder(), tdds_window, tdds_beta

    def add_epoch(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        self.recorder.add_epoch(probabilities)

    def scores(self) -> torch.Tensor:
        return self.recorder.scores(self.window, self.beta)

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.recorder.previous, "changes": list(self.recorder.changes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recorder.previous, self.recorder.changes = state["previous"], list(state["changes"])


def el2n(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``|| p - onehot(y) ||_2`` per row."""
    one_hot = F.one_hot(labels.long(), probabilities.shape[1]).to(probabilities.dtype)
    return torch.linalg.vector_norm(probabilities - one_hot, dim=1)


@register_selector("el2n")
class EL2NSelector(Selector):
    def __init__(self, num_samples: int, **_) -> None:
        super().__init__(num_samples)
        self.total: torch.Tensor | None = None
        self.epochs = 0

    def add_epoch(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        norms = el2n(probabilities, labels)
        self.total = norms if self.total is None else self.total + norms
        self.epochs += 1

    def scores(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("EL2N needs the outputs of at least one epoch")
        return self.total / self.epochs


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """``-sum_c p_c log p_c`` per row, ``0 log 0 = 0``."""
    return torch.special.entr(probabilities).sum(dim=1)


@register_selector("entropy")
class EntropySelector(Selector):
    def __init__(self, num_samples: int, **_) -> None:
        super().__init__(num_samples)
        self.last: torch.Tensor | None = None

    def add_epoch(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        self.last = probabilities

    def scores(self) -> torch.Tensor:
        if self.last is None:
            raise ValueError("entropy needs the outputs of at least one epoch")
        return entropy(self.last)


@register_selector("forgetting")
class ForgettingSelector(Selector):
    def __init__(self, num_samples: int, **_) -> None:
        super().__init__(num_samples)
        self.previous: torch.Tensor | None = None
        self.events: torch.Tensor | None = None
        self.ever_correct: torch.Tensor | None = None
        self.epochs = 0

    def add_epoch(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        correct = probabilities.argmax(dim=1) == labels.to(probabilities.device)
        if self.previous is None:
            self.events = torch.zeros_like(correct, dtype=torch.long)
            self.ever_correct = correct.clone()
        else:
            self.events += (self.previous & ~correct).long()
            self.ever_correct |= correct
        self.previous = correct
        self.epochs += 1

    def scores(self) -> torch.Tensor:
        if self.events is None:
            raise ValueError("forgetting needs the outputs of at least one epoch")
        never_learned = torch.full_like(self.events, self.epochs)
        return torch.where(self.ever_correct, self.events, never_learned).double()


def moderate_scores(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-|d_i - median_c(d)|`` with ``d_i`` the distance of sample ``i``'s features to its class mean.

    The median is torch's (the lower of the two middle values for an even count)."""
    features, labels = features.double(), labels.to(features.device)
    scores = torch.empty(features.shape[0], dtype=torch.float64, device=features.device)
    for label in labels.unique():
        members = labels == label
        distance = torch.linalg.vector_norm(features[members] - features[members].mean(dim=0), dim=1)
        scores[members] = -(distance - distance.median()).abs()
    return scores


@register_selector("moderate")
class ModerateSelector(Selector):
    needs_features = True

    def __init__(self, num_samples: int, **_) -> None:
        super().__init__(num_samples)
        self.features: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_features(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = (features, labels)

    def scores(self) -> torch.Tensor:
        if self.features is None:
            raise ValueError("moderate needs the features of the scored network")
        return moderate_scores(*self.features)


@register_selector("random")
class RandomSelector(Selector):
    needs_scoring = False

    def scores(self) -> torch.Tensor:
        return torch.zeros(self.num_samples, dtype=torch.float64)
