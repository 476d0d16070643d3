"""Schedule / RunSpec / method-option validation, JSON round trip and the lr curve."""

import math

import pytest

from harness.config import RunSpec, Schedule, parse_bits
from harness.errors import ConfigError
from harness.method_config import parse_method_spec
from harness.registry import get_method


@pytest.mark.parametrize("text", ["0", "33", "abc", "", " ", "2,2", "2,,4", "-1"])
def test_bad_bits_are_rejected(text):
    with pytest.raises(ConfigError):
        parse_bits(text)


def test_bits_are_sorted():
    assert parse_bits("32, 8,2") == (2, 8, 32)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"lr": -0.1}, {"lr": math.nan}, {"batch_size": 0},
                                    {"optimizer": "rmsprop"}, {"lr_schedule": "step"}, {"milestones": (40,)}])
def test_bad_schedules_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        Schedule(**{"epochs": 30, **kwargs})


def test_run_spec_round_trips_through_json():
    spec = RunSpec(methods=("anyprecision", "anyprecision:width=5"), bits=(2, 4), seeds=(0, 1),
                   schedule=Schedule(epochs=5, milestones=(2, 4), lr_schedule="step"))
    assert RunSpec.from_dict(__import__("json").loads(spec.to_json())) == spec


def test_lr_schedules():
    cosine = Schedule(epochs=10, lr_schedule="cosine")
    assert cosine.lr_factor(0, 0, 10) == 1.0
    assert cosine.lr_factor(5, 0, 10) == pytest.approx(0.5, abs=1e-12)
    step = Schedule(epochs=10, lr_schedule="step", milestones=(3, 6), gamma=0.1)
    assert [step.lr_factor(e, 0, 4) for e in (0, 2, 3, 6, 9)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    warm = Schedule(epochs=10, warmup_epochs=1, lr_schedule="constant")
    assert [warm.lr_factor(0, i, 4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_method_spec_parsing_and_option_validation():
    assert parse_method_spec("anyprecision:width=5:distill=none") == ("anyprecision",
                                                                       {"width": "5", "distill": "none"})
    cls = get_method("anyprecision")
    cfg = cls.Config.from_options({"width": "5", "distill": "none", "fp_shortcut": "false"})
    assert (cfg.width, cfg.distill, cfg.fp_shortcut) == (5.0, "none", False)
    for bad in ({"nope": "1"}, {"width": "abc"}, {"width": "-1"}, {"distill": "sideways"}, {"fp_shortcut": "2"}):
        with pytest.raises(ConfigError):
            cls.Config.from_options(bad)
    with pytest.raises(ConfigError):
        parse_method_spec("anyprecision:width")
