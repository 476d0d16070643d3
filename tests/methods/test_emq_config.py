"""EMQ's config: the defaults, option parsing, one-line errors, the scoring learning rate and the regime notes."""

from __future__ import annotations

import pytest

from harness.config import Schedule
from harness.errors import ConfigError
from harness.registry import get_method
from harness.train import instantiate
from methods.emq import EMQConfig
from methods.emq_config import scoring_lr_factor


def test_defaults_are_the_specs_and_options_parse_from_the_command_line():
    cfg = EMQConfig()
    assert (cfg.prune, cfg.tau, cfg.score_epochs, cfg.scoring, cfg.sampling, cfg.resample_every) == (
        0.8, 0.5, None, "bitwise", "softmax", 1)
    # 5 % of the schedule (the paper: 10 of 200 epochs), at least 3; a fixed count wins
    assert [cfg.scoring_epochs(e) for e in (10, 60, 70, 200, 400)] == [3, 3, 4, 10, 20]
    assert EMQConfig(score_epochs=12).scoring_epochs(200) == 12
    assert (cfg.bias_correction, cfg.shared_bn, cfg.share_binary_bn, cfg.bn_adapt_batches, cfg.distill) == (
        "per_layer", True, False, 100, "none")
    parsed = instantiate("emq:scoring=batchwise:sampling=power:prune=0:bias_correction=per_channel:act_bits=4:"
                         "shared_bn=off:tdds_window=none").cfg
    assert (parsed.scoring, parsed.sampling, parsed.prune, parsed.bias_correction, parsed.act_bits,
            parsed.shared_bn, parsed.tdds_window) == ("batchwise", "power", 0.0, "per_channel", 4, False, None)


@pytest.mark.parametrize("options, message", [
    ("prune=1", "prune must be in"), ("prune=-0.1", "prune must be in"), ("tau=0", "tau must be positive"),
    ("score_epochs=2", "at least 3"), ("score_epochs=4:tdds_window=4", "tdds_window must be in 2..score_epochs-1"),
    ("tdds_window=1", "tdds_window must be in 2..score_epochs-1"),
    ("resample_every=0", "resample_every"), ("bn_adapt_batches=-1", "bn_adapt_batches"), ("act_bits=0", "act_bits"),
    ("scoring=random", "must be one of"),
])
def test_invalid_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        instantiate(f"emq:{options}")


def test_scoring_lr_constant_or_the_schedule_compressed_into_the_scoring_epochs():
    schedule = Schedule(epochs=30, lr_schedule="cosine")
    assert scoring_lr_factor(schedule, "constant", 7, 3, 10, 10) == 1.0
    # scoring epoch 5 of 10 = main epoch 15 of 30: cosine factor 0.5 (1 + cos(pi / 2)) = 0.5
    assert scoring_lr_factor(schedule, "compressed", 5, 0, 10, 10) == pytest.approx(0.5)
    step = Schedule(epochs=20, lr_schedule="step", milestones=(10,))
    assert scoring_lr_factor(step, "compressed", 4, 9, 10, 10) == 1.0  # main epoch 9.8
    assert scoring_lr_factor(step, "compressed", 5, 0, 10, 10) == pytest.approx(0.1)  # main epoch 10


def test_regime_notes_flag_long_scoring_and_few_coreset_steps():
    method = get_method("emq")()
    paper = Schedule(epochs=200, batch_size=128)
    # CIFAR-10: 50,000 samples, 10 of 200 epochs scored, 10,000 kept: scoring is exactly 25 % -> in regime
    assert method.regime_notes(paper, (2, 4, 8), 50_000) == []
    assert method.regime_notes(Schedule(epochs=60, batch_size=32), (2, 4, 8), 1437) == []  # 25 %, 9 steps
    short = Schedule(epochs=20, batch_size=128)
    notes = method.regime_notes(short, (2, 4, 8), 1437)  # digits: 3 scoring epochs, 287 kept
    assert notes == ["scoring (3 epochs on all 1437 samples per bit-width) is 75% of its coreset training passes "
                     "(over 25%: the schedule is short for 80% pruning)",
                     "3 coreset steps per epoch (287 samples, batch 128; under 8)"]
    assert get_method("emq").from_options({"prune": "0"}).regime_notes(short, (2,), 1437) == []
