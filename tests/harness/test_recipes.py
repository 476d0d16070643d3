"""Per-data-set defaults of ``compare``: digits gets its CPU-sized recipe, other sets the generic one, flags win."""

from __future__ import annotations

import json

import pytest

import cli
from harness import compare as compare_module
from harness.config import Schedule
from harness.models import create_model
from harness.recipes import (
    DEIT_RECIPE,
    GENERIC,
    RESNET_RECIPE,
    VIT_SMALL_DATA_RECIPE,
    default_recipe,
    optimizer_recipe,
    resolve,
)
from harness.report import caption


def test_digits_has_its_own_recipe_and_every_other_set_the_generic_one():
    digits = default_recipe("digits")
    assert (digits.model, digits.width, digits.epochs, digits.batch_size) == ("resnet8", 1.0, 60, 32)
    assert default_recipe("fashion-mnist") == GENERIC
    assert (GENERIC.model, GENERIC.width, GENERIC.epochs, GENERIC.batch_size) == ("resnet20", 1.0, 20, 128)


def test_a_given_value_wins_over_the_recipe():
    assert resolve("digits", model=None, epochs=3) == {"model": "resnet8", "epochs": 3}
    assert resolve("cifar10", width=None, batch_size=None) == {"width": 1.0, "batch_size": 128}


def capture_spec(monkeypatch, args):
    seen = {}

    def fake_run(spec, out, **kwargs):
        seen["spec"] = spec
        return None, "table"

    monkeypatch.setattr(compare_module, "run_comparison", fake_run)
    assert cli.run(["compare", "--quiet", *args]) == 0
    return seen["spec"]


@pytest.mark.parametrize("args,expected", [
    ([], ("resnet8", 1.0, 60, 32)),
    (["--model", "resnet20", "--epochs", "5"], ("resnet20", 1.0, 5, 32)),
    (["--dataset", "fashion-mnist"], ("resnet20", 1.0, 20, 128)),
    (["--dataset", "fashion-mnist", "--width", "0.25", "--batch-size", "64"], ("resnet20", 0.25, 20, 64)),
])
def test_compare_resolves_the_flags_left_out_from_the_data_set(monkeypatch, tmp_path, args, expected):
    spec = capture_spec(monkeypatch, [*args, "--out", str(tmp_path / "out")])
    assert (spec.model, spec.width, spec.schedule.epochs, spec.schedule.batch_size) == expected


def test_resnet8_is_resnet20_with_one_block_per_stage():
    kwargs = dict(num_classes=10, in_chans=1, mean=(0.5,), std=(0.25,))
    shallow, deep = create_model("resnet8", **kwargs), create_model("resnet20", **kwargs)
    assert len(shallow.blocks) == 3 and len(deep.blocks) == 9
    convs = [m for m in shallow.modules() if type(m).__name__ == "Conv2d"]
    # stem, two convs per block, and the two 1x1 projections of the downsampling blocks
    assert len(convs) == 1 + 2 * 3 + 2
    assert [b.conv1.stride[0] for b in shallow.blocks] == [1, 2, 2]


OPTIMIZER_FIELDS = ("optimizer", "lr", "lr_schedule", "momentum", "weight_decay", "warmup_epochs", "recipe")


def optimizer_fields(spec) -> tuple:
    return tuple(getattr(spec.schedule, name) for name in OPTIMIZER_FIELDS)


def test_deit_recipe_scales_lr_by_batch_and_warms_up_five_of_every_300_epochs():
    settings = DEIT_RECIPE.settings(epochs=300, batch_size=1024)
    assert settings == {"optimizer": "adamw", "lr": 1e-3, "lr_schedule": "cosine", "momentum": 0.9,
                        "weight_decay": 0.05, "warmup_epochs": 5, "recipe": "deit-adamw"}
    assert DEIT_RECIPE.settings(epochs=20, batch_size=128)["warmup_epochs"] == 1  # at least one
    assert DEIT_RECIPE.settings(epochs=1, batch_size=128)["warmup_epochs"] == 0  # warm-up must end before the end
    assert DEIT_RECIPE.settings(epochs=20, batch_size=128)["lr"] == 5e-4 * 128 / 512


@pytest.mark.parametrize("args,expected", [
    (["--model", "deit_tiny", "--epochs", "60"], ("adamw", 1e-3, "cosine", 0.9, 0.05, 1, "vit-small-data")),
    (["--model", "deit_micro", "--dataset", "imagenet", "--epochs", "60"],
     ("adamw", 5e-4 * 128 / 512, "cosine", 0.9, 0.05, 1, "deit-adamw")),
    (["--model", "resnet20"], ("sgd", 0.05, "cosine", 0.9, 5e-4, 0, "resnet-sgd")),
    # any optimizer flag: no recipe, the generic defaults for the rest
    (["--model", "deit_tiny", "--lr", "0.001"], ("sgd", 0.001, "cosine", 0.9, 5e-4, 0, "")),
    (["--model", "deit_tiny", "--optimizer", "adamw"], ("adamw", 0.05, "cosine", 0.9, 5e-4, 0, "")),
])
def test_the_model_family_recipe_applies_only_when_no_optimizer_flag_is_given(monkeypatch, tmp_path, args, expected):
    spec = capture_spec(monkeypatch, ["--methods", "emq", *args, "--out", str(tmp_path / "out")])
    assert optimizer_fields(spec) == expected
    assert json.loads(spec.to_json())["schedule"]["recipe"] == expected[-1]  # what spec.json records


def test_vits_get_deit_lr_scaling_on_imagenet_only():
    assert optimizer_recipe("deit_micro", "imagenet") is DEIT_RECIPE
    assert optimizer_recipe("deit_tiny", "digits") is VIT_SMALL_DATA_RECIPE
    assert optimizer_recipe("resnet20", "imagenet") is RESNET_RECIPE
    settings = VIT_SMALL_DATA_RECIPE.settings(epochs=60, batch_size=32)
    assert settings == {"optimizer": "adamw", "lr": 1e-3, "lr_schedule": "cosine", "momentum": 0.9,
                        "weight_decay": 0.05, "warmup_epochs": 1, "recipe": "vit-small-data"}


def test_the_caption_names_the_recipe_and_the_warm_up():
    schedule = Schedule(epochs=20, **DEIT_RECIPE.settings(epochs=20, batch_size=128))
    record = {"method": "emq", "dataset": "digits", "model": "deit_tiny", "seed": 0, "device": "cpu",
              "schedule": schedule.to_dict()}
    assert "adamw lr 0.000125 cosine, 1 warm-up epochs (the deit-adamw recipe), batch 128;" in caption([record])
