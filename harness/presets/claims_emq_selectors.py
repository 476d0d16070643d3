"""EMQ's coreset comparison (NeurIPS 2025, the coreset-method table): its bit-wise TDDS coresets against a random
subset and EL2N at the same 80 % pruning and the same cost in sample-passes, scoring included, so a selector that
needs no scoring (random) trains longer on its budget. ``claims-emq-selectors-digits`` runs on 2 CPU cores;
``-fashion-mnist`` is sized for a GPU. ``claims-emq-rescoring-cifar100`` (GPU): the cost of re-scoring every 10
epochs against scoring once (Tables 20-21)."""

from dataclasses import replace

from harness.claims import Claim
from harness.config import Schedule
from harness.presets import Preset
from harness.presets.claims_emq import CIFAR, DIGITS, EMQ_PAPER

METHODS = ("emq", "emq:selector=random", "emq:selector=el2n")
CLAIMS = (
    Claim("emq-tdds-best-or-tied-among-selectors", f"{EMQ_PAPER}, coreset-selection comparison (80 % pruning)",
          kind="all_of", parts=(
              Claim(kind="no_worse", a="emq", b="emq:selector=random", margin=1.0),
              Claim(kind="no_worse", a="emq", b="emq:selector=el2n", margin=1.0),
          )),
)


def budget_of(train_size: int, epochs: int, bits: int, score_fraction: float = 0.05) -> float:
    """Sample-passes of EMQ's default TDDS run over ``epochs``: its scoring (5 % of the epochs, at least 3, on the
    whole set, per bit-width) plus 20 % coresets per epoch and bit-width."""
    score_epochs = max(3, round(score_fraction * epochs))
    return float(bits * (score_epochs * train_size + epochs * round(0.2 * train_size)))


NOTES = ("Equal cost: every method trains until it has spent the sample-passes of EMQ's TDDS run on the nominal "
         "schedule (scoring included), its lr curve stretched to that budget.",
         "Every selector is scored per bit-width and drawn by the same temperature sampling (tau 0.5); random "
         "needs no scoring.")

PRESETS = (
    Preset(name="claims-emq-selectors-digits", title="EMQ claims: TDDS against random and EL2N coresets (digits, "
           "resnet20)", dataset="digits", model="resnet20", width=0.5, bits=(2, 4, 8), methods=METHODS,
           schedule=replace(DIGITS, budget_kind="sample-passes", budget=budget_of(1437, DIGITS.epochs, 3)),
           notes=NOTES, data_needs="built in (scikit-learn's digits)", claims=CLAIMS, seeds=(0, 1, 2), size="cpu"),
    Preset(name="claims-emq-selectors-fashion-mnist", title="EMQ claims: TDDS against random and EL2N coresets "
           "(Fashion-MNIST, resnet20)", dataset="fashion-mnist", model="resnet20", bits=(2, 4, 8), methods=METHODS,
           schedule=Schedule(epochs=100, batch_size=128, lr=0.1, lr_schedule="cosine", weight_decay=5e-4,
                             augment=True, budget_kind="sample-passes", budget=budget_of(60_000, 100, 3)),
           notes=NOTES, data_needs="Fashion-MNIST idx files (the Debian package dataset-fashion-mnist, or "
           "--data-root)", claims=CLAIMS, seeds=(0, 1, 2), size="full"),
    Preset(name="claims-emq-rescoring-cifar100", title="EMQ claims: the cost of re-scoring every 10 epochs "
           "(CIFAR-100, preact_resnet20)", dataset="cifar100", model="preact_resnet20", bits=(1, 2, 4, 8, 32),
           methods=("emq", "emq:rescore_every=10"), schedule=CIFAR,
           notes=("Re-scoring runs a full scoring phase (5 % of the epochs per bit-width, on all of the data) from "
                  "the current network before every 10th epoch; the paper reports 1.47 GPU-hours scoring once "
                  "against 16.04 re-scoring (10.9x).",),
           data_needs="CIFAR-100 python files under --data-root (cifar-100-python/)",
           claims=(Claim("emq-rescoring-costs-about-11x", f"{EMQ_PAPER}, Tables 20-21 (80 % pruning)",
                         kind="cost_ratio", a="emq:rescore_every=10", b="emq", ratio=10.9, cost="device_hours"),),
           seeds=(0, 1, 2), size="full"),
)
