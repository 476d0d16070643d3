"""Per-data-set defaults of ``compare``: the model, width, epochs and batch size used when no flag sets them.

The defaults must put every method in its operating regime on the machine the data set is meant for. On the
embedded digits set (1,437 training images of 8x8 pixels, run on a laptop's CPU cores) that means, for EMQ's
coreset at 80 % pruning (287 images): scoring at most a quarter of its coreset training passes, as in the paper
(3 scoring epochs need 60 epochs of training) and at least 8 coreset steps per epoch (batch 32 gives 9). A step of
a network this small costs its operations' overhead, not their arithmetic, so the depth sets the time: ResNet-8,
the one-block-per-stage member of ResNet-20's family, at half width runs the main job in about three minutes on
two cores where ResNet-20 needs about eight (``results/measured/digits-main.md``). Every other data set keeps
the generic defaults (ResNet-20 at width 1, 20 epochs, batch 128), meant to be overridden.

A flag given on the command line always wins, and the resolved values are what ``spec.json`` records: every
method of a comparison shares them.
"""

from __future__ import annotations

import dataclasses

from harness.config import JsonConfig


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
    "digits": DefaultRecipe(name="digits", model="resnet8", width=0.5, epochs=60, batch_size=32),
}


def default_recipe(dataset: str) -> DefaultRecipe:
    return DATASET_RECIPES.get(dataset, GENERIC)


def resolve(dataset: str, **given: object) -> dict[str, object]:
    """The recipe's value for every field in ``given`` that is ``None``; the given value otherwise."""
    recipe = default_recipe(dataset)
    return {field: getattr(recipe, field) if value is None else value for field, value in given.items()}
