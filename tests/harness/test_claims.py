"""Claims: verdicts on hand-made records (holds, does not hold, inconclusive, with exact interval bounds), the
claim vocabulary's validation and JSON round trip, and the CLI (`list presets`, `reproduce --all-claims`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cli
from harness import presets
from harness.claims import FAILS, HOLDS, INCONCLUSIVE, Claim, decide, evaluate
from harness.config import Schedule
from harness.errors import ConfigError, MbqError
from harness.presets import Preset
from harness.reproduce import claims_summary, reproduce_markdown


def record(method, top1_by_bits, seed=0, hours=1.0, passes=100, bits=None):
    """A record in ``harness.train.make_record``'s format (only the fields claims and the gap table read)."""
    return {"method": method, "seed": seed, "dataset": "cifar10", "model": "m", "epochs": 1, "device": "cpu",
            "bits": list(bits if bits is not None else top1_by_bits),
            "results": {str(b): {"top1": v, "top5": 100.0, "storage_bytes": 1, "sample_passes": 1}
                        for b, v in top1_by_bits.items()},
            "storage_total_bytes": 1, "device_hours": hours, "sample_passes_total": passes,
            "device_hours_by_phase": {"prepare": 0.0, "train": hours, "finalize": 0.0, "eval": 0.0}}


def bootstrap_bounds(values):
    """The 95% percentile bootstrap interval of the mean, computed independently of scipy with the resampling rule
    ``harness.report.seed_stats`` uses (scipy's legacy ``random_state=0`` draw: RandomState(0).randint, 2000 rows)."""
    data = np.asarray(values, dtype=float)
    index = np.random.RandomState(0).randint(0, len(data), (2000, len(data)))
    low, high = np.percentile(data[index].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def exact(x):
    return pytest.approx(x, rel=0, abs=1e-12)


# ------------------------------------------------------------------------------------------------- verdicts


def test_equal_per_seed_differences_give_a_point_interval_and_hold():
    # every seed 0.5 below the full-data run on the mean over bit-widths: the interval is exactly [-0.5, -0.5]
    records = [rec for seed in (0, 1, 2) for rec in (
        record("emq", {2: 90.0 + seed, 4: 92.0 + seed}, seed=seed, hours=1.0),
        record("emq:prune=0", {2: 90.5 + seed, 4: 92.5 + seed}, seed=seed, hours=4.0))]
    claim = Claim("emq-coreset-within-1pt", "EMQ Table 2", kind="all_of", parts=(
        Claim(kind="no_worse", a="emq", b="emq:prune=0", margin=1.0),
        Claim(kind="cost_ratio", a="emq:prune=0", b="emq", ratio=3.5)))
    verdict = evaluate(claim, records)
    assert verdict.verdict == HOLDS
    accuracy, cost = verdict.effects
    assert (accuracy.n, accuracy.mean, accuracy.low, accuracy.high) == (3, exact(-0.5), exact(-0.5), exact(-0.5))
    assert (cost.mean, cost.low, cost.high) == (4.0, 4.0, 4.0)
    assert verdict.line() == (
        "holds         emq-coreset-within-1pt: emq@mean - emq:prune=0@mean = -0.50 [-0.50, -0.50] pt (>= -1; "
        "3 seeds), device_hours emq:prune=0 / emq = 4.00x [4.00, 4.00] (>= 3.5x; 3 seeds)  — EMQ Table 2")


def test_better_does_not_hold_when_the_whole_interval_is_below_and_bounds_match_numpy():
    diffs = [-0.7, -1.2, -0.3, -0.9, -0.5]  # mbquant - anyprecision at 2 bits, per seed
    records = [rec for seed, d in enumerate(diffs) for rec in (
        record("mbquant", {2: 85.0 + d, 4: 90.0}, seed=seed), record("anyprecision", {2: 85.0, 4: 90.0}, seed=seed))]
    verdict = evaluate(Claim("mbquant-beats-anyprecision-2bit", "MBQuant Table 3", kind="better", a="mbquant",
                             b="anyprecision", bits=2), records)
    (effect,) = verdict.effects
    low, high = bootstrap_bounds([85.0 + d - 85.0 for d in diffs])
    assert verdict.verdict == FAILS and high < 0
    assert (effect.n, effect.mean, effect.low, effect.high) == (5, exact(np.mean(diffs)), exact(low), exact(high))
    assert effect.describe() == f"mbquant@2 - anyprecision@2 = -0.72 [{low:.2f}, {high:.2f}] pt (> 0; 5 seeds)"


def test_inconclusive_when_the_interval_straddles_the_threshold():
    diffs = [0.3, -0.7, 0.1, -0.2, -1.1]
    records = [rec for seed, d in enumerate(diffs) for rec in (
        record("anyprecision", {8: 93.0 + d}, seed=seed), record("fp", {32: 93.0}, seed=seed))]
    claim = Claim("ap-8bit-near-fp", "Any-Precision README", kind="no_worse", a="anyprecision", bits=8, b="fp",
                  margin=0.5)
    verdict = evaluate(claim, records)
    (effect,) = verdict.effects
    low, high = bootstrap_bounds([93.0 + d - 93.0 for d in diffs])
    assert (low, high) == (exact(-0.78), exact(0.1))  # the independent computation, pinned
    assert verdict.verdict == INCONCLUSIVE and effect.low < -0.5 < effect.high
    assert (effect.mean, effect.low, effect.high) == (exact(-0.32), exact(low), exact(high))
    assert effect.label == "anyprecision@8 - fp@32"  # the fp row is read at 32 bits although the claim says 8


def test_one_seed_is_decided_on_the_point_estimate_and_says_so():
    records = [record("anyprecision", {8: 93.2}), record("fp", {32: 93.5})]
    claim = Claim("ap-8bit", "src", kind="no_worse", a="anyprecision", bits=8, b="fp", margin=1.0)
    verdict = evaluate(claim, records)
    assert verdict.verdict == HOLDS
    assert verdict.effects[0].low is None and verdict.effects[0].n == 1
    assert verdict.line() == "holds         ap-8bit: anyprecision@8 - fp@32 = -0.30 pt (>= -1; 1 seed)  — src"
    tight = Claim("ap-8bit", "src", kind="no_worse", a="anyprecision", bits=8, b="fp", margin=0.2)
    assert evaluate(tight, records).verdict == FAILS


AP = "anyprecision:fp_shortcut=true"  # the preset runs the authors' network


def test_missing_fp_record_is_inconclusive_not_a_crash():
    claim = presets.get_preset("anyprecision-cifar10-resnet20").claims[0]
    verdict = evaluate(claim, [record(AP, {8: 93.0}), record("dedicated", {8: 93.0})])
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effects[0].describe() == f"{AP}@8 - fp@32: no fp record"
    assert evaluate(claim, [record(AP, {8: 93.0}, seed=0), record("fp", {32: 93.5}, seed=1)]
                    ).effects[0].reason == "no seed in common"
    assert evaluate(claim, [record(AP, {4: 93.0}), record("fp", {32: 93.5})]
                    ).effects[0].reason == f"no {AP} result at 8 bits"


def test_between_interpolated_bit_width():
    records = [record("emq", {2: 88.0 + s, 3: 90.0 + s, 4: 91.0 + s}, seed=s, bits=(2, 4)) for s in (0, 1)]
    claim = Claim("emq-3bit-between", "EMQ Fig. 4", kind="between", a="emq", bits=3, b_bits=2, c_bits=4)
    verdict = evaluate(claim, records)
    assert verdict.verdict == HOLDS
    assert [(e.label, e.mean, e.low, e.high) for e in verdict.effects] == [
        ("emq@3 - emq@2", 2.0, 2.0, 2.0), ("emq@4 - emq@3", 1.0, 1.0, 1.0)]
    below = [record("emq", {2: 88.0, 3: 87.0, 4: 91.0}, seed=s) for s in (0, 1)]
    assert evaluate(claim, below).verdict == FAILS
    # the mean over bit-widths reads the trained ones only (record["bits"]): (88 + 91) / 2, not with 3-bit's 90
    mean = Claim("m", "s", kind="within", a="emq", b="fp", margin=0.0)
    assert evaluate(mean, [records[0], record("fp", {32: 89.5})]).effects[0].mean == 0.0


def test_better_than_two_rivals_and_far_below():
    # tau=0.5 beats 0.1 (by 1.0 on every seed) but not 1.0 (seeds 1.0 and -0.2: interval [-0.2, 1.0])
    records = [rec for s, (x, y, z) in enumerate([(91.0, 90.0, 90.0), (91.0, 90.0, 91.2)]) for rec in (
        record("emq:tau=0.5", {4: x}, seed=s), record("emq:tau=0.1", {4: y}, seed=s),
        record("emq:tau=1.0", {4: z}, seed=s))]
    claim = Claim("tau", "EMQ Table 5", kind="better", a="emq:tau=0.5", b="emq:tau=0.1", c="emq:tau=1.0", bits=4)
    verdict = evaluate(claim, records)
    assert [e.verdict for e in verdict.effects] == [HOLDS, INCONCLUSIVE] and verdict.verdict == INCONCLUSIVE
    assert (verdict.effects[1].low, verdict.effects[1].high) == (exact(-0.2), exact(1.0))  # two seeds: [min, max]
    far = [record("dedicated", {1: 91.5}, seed=s) for s in (0, 1)] + [
        record("anyprecision", {1: 80.0 + s}, seed=s) for s in (0, 1)]
    gap = Claim("far-below", "src", kind="better", a="dedicated", b="anyprecision", bits=1, margin=10.0)
    assert evaluate(gap, far).verdict == HOLDS  # differences 11.5 and 10.5, all above 10
    assert evaluate(Claim("far", "src", kind="better", a="dedicated", b="anyprecision", bits=1, margin=11.0),
                    far).verdict == INCONCLUSIVE


def test_within_is_two_sided():
    records = [record("anyprecision", {8: 95.0}, seed=s) for s in (0, 1)] + [
        record("dedicated", {8: 93.5}, seed=s) for s in (0, 1)]
    both = Claim("w", "src", kind="within", a="anyprecision", b="dedicated", bits=8, margin=1.0)
    assert evaluate(both, records).verdict == FAILS  # 1.5 above: outside ±1 although not worse
    assert evaluate(Claim("w", "src", kind="no_worse", a="anyprecision", b="dedicated", bits=8, margin=1.0),
                    records).verdict == HOLDS
    assert evaluate(both, records).effects[0].test == "within ±1"


def test_cost_ratio_is_per_seed_and_a_failed_part_fails_all_of():
    records = [rec for s, (fast, slow) in enumerate([(1.0, 3.0), (1.0, 3.2)]) for rec in (
        record("emq", {2: 90.0}, seed=s, hours=fast, passes=100), record("emq:prune=0", {2: 90.0}, seed=s,
                                                                         hours=slow, passes=500))]
    hours = Claim("speed", "src", kind="cost_ratio", a="emq:prune=0", b="emq", ratio=3.5)
    effect = evaluate(hours, records).effects[0]
    assert (effect.verdict, effect.low, effect.high) == (FAILS, 3.0, exact(3.2))
    passes = Claim("passes", "src", kind="cost_ratio", a="emq:prune=0", b="emq", ratio=4.5, cost="sample_passes_total")
    assert evaluate(passes, records).verdict == HOLDS
    both = Claim("both", "src", kind="all_of", parts=(passes, hours))
    assert evaluate(both, records).verdict == FAILS


@pytest.mark.parametrize("op,threshold,low,high,expected", [
    (">=", -1.0, 93.1 - 94.1, 0.0, HOLDS),  # a float tie counts as meeting the bound
    (">=", -1.0, -3.0, -1.5, FAILS), (">=", -1.0, -1.5, 0.0, INCONCLUSIVE),
    (">", 0.0, 0.0, 1.0, INCONCLUSIVE), (">", 0.0, -1.0, 0.0, FAILS), (">", 0.0, 0.1, 1.0, HOLDS),
    ("abs<=", 1.0, -1.0, 1.0, HOLDS), ("abs<=", 1.0, 0.5, 1.5, INCONCLUSIVE), ("abs<=", 1.0, 1.2, 1.5, FAILS),
    ("abs<=", 1.0, -1.5, -1.2, FAILS),
])
def test_decide(op, threshold, low, high, expected):
    assert decide(op, threshold, low, high) == expected


def test_duplicate_cells_are_an_error():
    with pytest.raises(MbqError, match="two records of emq seed 0"):
        evaluate(Claim("x", "s", kind="better", a="emq", b="fp", bits=None), [record("emq", {2: 1.0})] * 2)


# ------------------------------------------------------------------------------------------------- validation


def _preset(claims, methods=("emq", "emq:prune=0"), bits=(2, 4), eval_bits=None):
    return Preset(name="p", title="t", dataset="synthetic", model="resnet20", bits=bits, eval_bits=eval_bits,
                  methods=methods, schedule=Schedule(epochs=2), claims=claims)


@pytest.mark.parametrize("claims,message", [
    ((Claim("c", "s", kind="better", a="emq", b="emq:prune=1"),), "names method 'emq:prune=1', which the preset"),
    ((Claim("c", "s", kind="all_of", parts=(Claim(kind="better", a="mbquant", b="emq"),)),), "names method 'mbquant'"),
    ((Claim("c", "s", kind="between", a="emq", bits=3, b_bits=2, c_bits=4),), "reads emq at 3 bits"),
    ((Claim("c", "s", kind="better", a="emq", b="fp"),) * 2, "defined twice"),
    ((Claim("c", "", kind="better", a="emq", b="fp"),), "needs a name and a source"),
    (("emq > fp",), "must be Claim objects"),
])
def test_bad_claims_in_a_preset_are_config_errors(claims, message):
    with pytest.raises(ConfigError, match=message):
        _preset(claims)


def test_untrained_bit_width_in_eval_bits_and_fp_are_accepted():
    claims = (Claim("c", "s", kind="between", a="emq", bits=3, b_bits=2, c_bits=4),
              Claim("f", "s", kind="no_worse", a="emq", bits=4, b="fp", margin=1.0))
    assert _preset(claims, eval_bits=(2, 3, 4)).claims == claims


@pytest.mark.parametrize("fields,message", [
    ({"kind": "roughly", "a": "x", "b": "y"}, "unknown kind 'roughly'"),
    ({"kind": "better", "a": "x"}, "needs method b"),
    ({"kind": "better", "b": "x"}, "needs method a"),
    ({"kind": "cost_ratio", "a": "x", "b": "y"}, "needs a ratio"),
    ({"kind": "cost_ratio", "a": "x", "b": "y", "ratio": 2.0, "cost": "watts"}, "unknown cost 'watts'"),
    ({"kind": "cost_ratio", "a": "x", "b": "y", "ratio": 2.0, "bits": 2}, "takes no bits"),
    ({"kind": "better", "a": "x", "b": "y", "ratio": 2.0}, "only cost_ratio takes a ratio"),
    ({"kind": "within", "a": "x", "b": "y", "margin": -1.0}, "margin must be non-negative"),
    ({"kind": "within", "a": "x", "b": "y", "bits": 33}, "bits must be a bit-width"),
    ({"kind": "within", "a": "x", "b": "fp", "b_bits": 8}, "read at 32 bits"),
    ({"kind": "within", "a": "x", "b": "y", "c": "z"}, "only better and between"),
    ({"kind": "between", "a": "x", "bits": 3}, "needs b_bits and c_bits"),
    ({"kind": "all_of"}, "needs parts"),
    ({"kind": "all_of", "a": "x", "parts": (Claim(kind="better", a="x", b="y"),)}, "takes parts only"),
    ({"kind": "better", "a": "x", "b": "y", "parts": (Claim(kind="better", a="x", b="y"),)}, "only all_of"),
])
def test_claim_fields_are_validated(fields, message):
    with pytest.raises(ConfigError, match=message):
        Claim("c", "s", **fields)


def test_claims_round_trip_through_json_and_read_in_words():
    claim = Claim("emq-coreset", "EMQ Table 2", kind="all_of", parts=(
        Claim(kind="no_worse", a="emq", b="emq:prune=0", margin=1.0),
        Claim(kind="cost_ratio", a="emq:prune=0", b="emq", ratio=3.5)))
    assert Claim.from_dict(json.loads(claim.to_json())) == claim
    assert claim.statement == ("top-1 of emq (mean over bit-widths) at most 1 pt below top-1 of emq:prune=0 (mean "
                               "over bit-widths); and device-hours (every phase) of emq:prune=0 over emq >= 3.5x")
    assert Claim("t", "s", kind="better", a="x", b="y", c="z", bits=2).statement == (
        "top-1 of x at 2 bits above top-1 of y at 2 bits and top-1 of z at 2 bits")
    assert Claim("t", "s", kind="within", a="x", b="y", text="x matches y").statement == "x matches y"


# ------------------------------------------------------------------------------------------------- reports, CLI


def test_reproduce_markdown_and_summary_carry_the_verdict_lines():
    preset = presets.get_preset("anyprecision-cifar10-resnet20")
    records = [record(AP, {8: 93.0}), record("fp", {32: 93.5})]
    text = reproduce_markdown(preset, records, epochs_run=preset.schedule.epochs)
    line = (f"- holds         anyprecision-8bit-within-1pt-of-fp: {AP}@8 - fp@32 = -0.50 pt (>= -1; 1 seed)  — "
            f"{preset.claims[0].source}")
    assert line in text.splitlines()
    summary = claims_summary([(preset, [evaluate(preset.claims[0], records)], 20)])
    assert "| anyprecision-cifar10-resnet20 (20 of 200 epochs) | anyprecision-8bit-within-1pt-of-fp: top-1 of " \
           f"{AP} at 8 bits at most 1 pt below full-precision top-1 | holds |" in summary
    assert "1 holds, 0 does not hold, 0 inconclusive." in summary


def test_list_presets_shows_each_claim(capsys):
    assert cli.run(["list", "presets"]) == 0
    out = capsys.readouterr().out
    claim = presets.get_preset("anyprecision-cifar10-resnet20").claims[0]
    assert f"claim {claim.name}: {claim.statement} [{claim.source}]" in out


@pytest.mark.parametrize("args", [["reproduce"], ["reproduce", "fmnist-all", "--all-claims"]])
def test_reproduce_needs_exactly_one_of_preset_and_all_claims(capsys, args):
    assert cli.run(args) == 2
    assert capsys.readouterr().err.startswith("error: give one PRESET, or --all-claims")


def test_all_claims_runs_every_preset_with_claims_and_writes_one_summary(capsys, tmp_path, monkeypatch):
    tiny = Preset(name="tiny-claims", title="tiny", dataset="synthetic", model="resnet20", width=0.25, bits=(2, 32),
                  methods=("anyprecision", "dedicated"), schedule=Schedule(epochs=2, batch_size=64, lr=0.05),
                  claims=(Claim("ap-2bit-near-dedicated", "made up", kind="within", a="anyprecision",
                                b="dedicated", bits=2, margin=100.0),
                          Claim("ap-2bit-vs-fp", "made up", kind="no_worse", a="anyprecision", bits=2, b="fp",
                                margin=100.0)), size="cpu")
    plain = Preset(name="no-claims", title="none", dataset="nosuchdata", model="resnet20", bits=(2,),
                   methods=("anyprecision",), schedule=Schedule(epochs=2))
    # paper-sized: --all-claims runs it only with --full-size (its data set does not exist here)
    big = Preset(name="big-claims", title="big", dataset="nosuchdata", model="resnet20", bits=(2,),
                 methods=("anyprecision",), schedule=Schedule(epochs=2), size="full",
                 claims=(Claim("ap-vs-fp", "made up", kind="no_worse", a="anyprecision", bits=2, b="fp"),))
    monkeypatch.setattr(presets, "_PRESETS", {tiny.name: tiny, plain.name: plain, big.name: big})
    assert presets.claim_presets("cpu") == ["tiny-claims"] and presets.claim_presets("full") == ["big-claims"]
    out = tmp_path / "claims"
    code = cli.run(["reproduce", "--all-claims", "--epochs", "1", "--train-subset", "64", "--test-subset", "32",
                    "--device", "cpu", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert folder.name.startswith("tiny-claims-")  # the preset without claims (and bad data) did not run
    summary = (out / "summary.md").read_text()
    assert summary in captured.out
    assert "| tiny-claims (1 of 2 epochs) | ap-2bit-near-dedicated:" in summary and "| holds |" in summary
    assert "- holds         ap-2bit-near-dedicated: anyprecision@2 - dedicated@2 = " in (
        folder / "reproduce.md").read_text()
    verdicts = json.loads((folder / "claims.json").read_text())
    assert [v["claim"] for v in verdicts] == ["ap-2bit-near-dedicated", "ap-2bit-vs-fp"]
    assert verdicts[0]["verdict"] == HOLDS and verdicts[0]["effects"][0]["n"] == 1


def test_full_size_without_all_claims_is_a_one_line_error(capsys):
    assert cli.run(["reproduce", "fmnist-all", "--full-size"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --full-size selects the claim presets of --all-claims") and err.count("\n") == 1
