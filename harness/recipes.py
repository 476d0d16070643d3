"""Defaults of ``compare`` for the flags the user left out: the model, width, epochs and batch size come from
the data set (:func:`default_recipe`), the optimizer settings from the model family (:func:`optimizer_recipe`).

The defaults must put every method in its operating regime on the machine the data set is meant for. On the
embedded digits set (1,437 training images of 8x8 pixels, run on a laptop's CPU cores) that means, for EMQ's
coreset at 80 % pruning (287 images): scoring at most a quarter of its coreset training passes, as in the paper
(3 scoring epochs need 60 epochs of training) and at least 8 coreset steps per epoch (batch 32 gives 9). A step of
a network this small costs its operations' overhead, not their arithmetic, so the depth sets the time: ResNet-8,
the one-block-per-stage member of ResNet-20's family, runs the main job in under four minutes on two cores where
ResNet-20 needs about eight (``results/measured/digits-main.md``). Width 1 rather than 0.5: at half width EMQ's
coreset run fell 1.2-2.0 points below its full-data run, at width 1 0.1 points. Every other data set keeps
the generic defaults (ResNet-20 at width 1, 20 epochs, batch 128), meant to be overridden.

The optimizer recipe follows the model family. Convolutional networks get the ResNet recipe the suite has always
used (SGD with Nesterov momentum 0.9, lr 0.05, weight decay 5e-4, cosine, no warm-up). Vision transformers get the
DeiT recipe (Touvron et al., ICML 2021, Sec. 6 / Table 9): AdamW, lr 5e-4 x batch / 512, weight decay 0.05, a linear
warm-up over 5 of every 300 epochs (at least one when the schedule has more than one epoch), then cosine. DeiT's
label smoothing, mixup and stochastic depth are not applied: the harness has no per-method loss hook for them, and
every method computes its own loss. DeiT's learning rate rule (5e-4 per 512 images of batch) is tuned on ImageNet;
on the small sets this suite runs on a CPU it gives 3e-5 at batch 32, and ``deit_micro`` on digits then reached
78.9 % in 60 epochs against 98.1 % at 1e-3 (``results/measured/vit-digits.md``). So ViTs get the DeiT recipe
on ImageNet and, everywhere else, the same recipe with an unscaled lr of 1e-3 (``vit-small-data``), the usual
setting for ViTs trained from scratch on CIFAR-sized data. The recipe applies only when none of ``--optimizer``,
``--lr``, ``--lr-schedule``, ``--momentum``, ``--weight-decay`` and ``--warmup-epochs`` is given; with any of them,
the others take the generic defaults of :class:`harness.config.Schedule`, so an explicit flag is never mixed with a
recipe it did not ask for. The recipe's name is stored in the schedule (``spec.json``) and printed under the table.

A flag given on the command line always wins, and the resolved values are what ``spec.json`` records: every
method of a comparison shares them.
"""

from __future__ import annotations

import dataclasses

from harness.config import JsonConfig, Schedule
from harness.models import VIT_MODELS


@dataclasses.dataclass(frozen=True)
class DefaultRecipe(JsonConfig):
    """What ``compare`` uses for the flags the user left out."""

    name: str
    model: str
    width: float
    epochs: int
    batch_size: int


GENERIC = DefaultRecipe(name="generic", model="resnet20", width=1.0, epochs=20, batch_size=128)
DATASET_RECIPES: dict[str, DefaultRecipe] = {
    "digits": DefaultRecipe(name="digits", model="resnet8", width=1.0, epochs=60, batch_size=32),
}


def default_recipe(dataset: str) -> DefaultRecipe:
    return DATASET_RECIPES.get(dataset, GENERIC)


def resolve(dataset: str, **given: object) -> dict[str, object]:
    """The recipe's value for every field in ``given`` that is ``None``; the given value otherwise."""
    recipe = default_recipe(dataset)
    return {field: getattr(recipe, field) if value is None else value for field, value in given.items()}


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe(JsonConfig):
    """Optimizer settings of a model family; ``lr`` is for a batch of ``lr_batch`` (``None``: not scaled)."""

    name: str
    optimizer: str
    lr: float
    lr_schedule: str
    momentum: float
    weight_decay: float
    warmup_share: float = 0.0
    lr_batch: int | None = None

    def settings(self, epochs: int, batch_size: int) -> dict[str, object]:
        """The schedule fields of this recipe for a run of ``epochs`` at ``batch_size``."""
        lr = self.lr * batch_size / self.lr_batch if self.lr_batch else self.lr
        warmup = 0
        if epochs > 1 and self.warmup_share:
            warmup = min(epochs - 1, max(1, round(self.warmup_share * epochs)))
        return {"optimizer": self.optimizer, "lr": lr, "lr_schedule": self.lr_schedule, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "warmup_epochs": warmup, "recipe": self.name}


_GENERIC_SCHEDULE = Schedule()
RESNET_RECIPE = OptimizerRecipe(name="resnet-sgd", optimizer="sgd", lr=_GENERIC_SCHEDULE.lr, lr_schedule="cosine",
                                momentum=_GENERIC_SCHEDULE.momentum, weight_decay=_GENERIC_SCHEDULE.weight_decay)
DEIT_RECIPE = OptimizerRecipe(name="deit-adamw", optimizer="adamw", lr=5e-4, lr_schedule="cosine", momentum=0.9,
                              weight_decay=0.05, warmup_share=5 / 300, lr_batch=512)
VIT_SMALL_DATA_RECIPE = dataclasses.replace(DEIT_RECIPE, name="vit-small-data", lr=1e-3, lr_batch=None)
# DeiT's lr-per-batch rule was tuned on ImageNet's 1.28 M images; only there is it the ViT default.
DEIT_DATASETS = ("imagenet",)


def optimizer_recipe(model: str, dataset: str = "imagenet") -> OptimizerRecipe:
    if model not in VIT_MODELS:
        return RESNET_RECIPE
    return DEIT_RECIPE if dataset in DEIT_DATASETS else VIT_SMALL_DATA_RECIPE


def resolve_optimizer(model: str, epochs: int, batch_size: int, dataset: str = "imagenet",
                      **given: object) -> dict[str, object]:
    """Schedule fields for the optimizer flags ``given`` (``None``: left out): the recipe of the model family (and,
    for ViTs, of the data set's size) when every one is left out, else the given values over
    :class:`~harness.config.Schedule`'s defaults."""
    if all(value is None for value in given.values()):
        return optimizer_recipe(model, dataset).settings(epochs, batch_size)
    resolved = {name: getattr(_GENERIC_SCHEDULE, name) if value is None else value for name, value in given.items()}
    return {**resolved, "recipe": ""}
