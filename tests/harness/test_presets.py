"""Paper presets: each loads, validates and runs end to end on tiny fixture data in its format; the gap
table and the example claim are computed correctly on hand-made records."""

from __future__ import annotations

import dataclasses

import pytest

from harness.claims import FP, HOLDS, INCONCLUSIVE, evaluate_all
from harness.compare import run_comparison
from harness.presets import get_preset, list_presets, shortened
from harness.reproduce import UNVERIFIED, gap_table, reproduce_markdown
from tests.fixtures import write_dataset

REQUIRED = {"anyprecision-cifar10-resnet20", "mbquant-cifar100-resnet20", "mbquant-imagenet-resnet18",
            "mbquant-imagenet-resnet18-234", "mbquant-imagenet-mobilenetv1",
            "emq-cifar10-preactresnet20", "fmnist-all", "claims-emq-digits", "claims-emq-ablations-digits",
            "claims-mbquant-digits", "claims-anyprecision-digits", "claims-emq-selectors-digits",
            "claims-emq-vit-digits", "claims-emq-vit-imagenet"}


def test_required_presets_exist():
    assert REQUIRED <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_runs_one_epoch_on_fixture_data(name, tmp_path):
    preset = get_preset(name)
    built_in = preset.dataset in ("digits", "synthetic")  # no files to write; a small subset keeps it fast
    root = None if built_in else str(write_dataset(tmp_path / "data", preset.dataset))
    # The smallest width keeps the smoke test fast; one seed, whatever the preset's default.
    spec = preset.run_spec(epochs=1, data_root=root, device="cpu", seeds=(0,), width=0.25,
                           train_subset=64 if built_in else None, test_subset=32 if built_in else None)
    if spec.schedule.budget is not None:  # a budget sized for the real data set: the nominal epoch here instead
        spec = dataclasses.replace(spec, schedule=dataclasses.replace(spec.schedule, budget_kind=None, budget=None))
    records, _ = run_comparison(spec, tmp_path / "out", show_progress=False)
    # the comparison may add the full-precision reference row (method "fp") to the preset's methods
    assert set(preset.methods) <= {r["method"] for r in records} <= {*preset.methods, FP}
    text = reproduce_markdown(preset, records, epochs_run=1)
    assert "Shortened schedule: 1 of" in text
    for verdict in evaluate_all(preset.claims, records):
        assert f"- {verdict.line()}" in text.splitlines()
    published = preset.published()
    if not published.empty:
        table = gap_table(preset, records)
        assert len(table) == len(published)


# The paper presets run the authors' network: the full-precision shortcut departure (docs/fairness.md).
AP, DEDICATED = "anyprecision:fp_shortcut=true", "dedicated:fp_shortcut=true"
EMQ, EMQ_FULL = "emq:fp_shortcut=true", "emq:prune=0:fp_shortcut=true"


def test_published_numbers_parse():
    published = get_preset("anyprecision-cifar10-resnet20").published()
    row = published[(published["method"] == AP) & (published["bits"] == 2)]
    assert row["value"].tolist() == [93.90]
    assert get_preset("mbquant-cifar100-resnet20").published()["value"].isna().all()


def _record(method, top1_by_bits, seed=0, hours=1.0, passes=100):
    return {"method": method, "seed": seed, "dataset": "cifar10", "model": "m", "epochs": 1, "device": "cpu",
            "results": {str(b): {"top1": v, "top5": 100.0, "storage_bytes": 1, "sample_passes": 1}
                        for b, v in top1_by_bits.items()},
            "storage_total_bytes": 1, "device_hours": hours, "sample_passes_total": passes,
            "device_hours_by_phase": {"prepare": 0, "train": hours, "finalize": 0, "eval": 0}}


def test_gap_table_on_hand_made_records():
    preset = get_preset("anyprecision-cifar10-resnet20")
    bits = (1, 2, 4, 8, 32)
    records = [_record(AP, dict(zip(bits, (90.0, 93.0, 94.0, 93.0, 95.0))), seed=0),
               _record(AP, dict(zip(bits, (92.0, 93.0, 94.0, 93.0, 95.0))), seed=1),
               _record(DEDICATED, dict(zip(bits, (91.5, 93.26, 93.62, 93.42, 93.58))))]
    table = gap_table(preset, records).set_index(["method", "bits"])
    assert table.loc[(AP, 1), "measured"] == "91.00 ± 1.41 (n=2)"
    assert table.loc[(AP, 1), "gap"] == "-0.89"  # 91.00 - 91.89
    assert table.loc[(AP, 32), "gap"] == "0.89"  # 95.00 - 94.11
    assert table.loc[(DEDICATED, 8), "gap"] == "0.00"


def test_gap_table_speedup_and_mean_and_unverified_cells():
    preset = get_preset("emq-cifar10-preactresnet20")
    bits = preset.bits
    records = [_record(EMQ, {b: 93.0 + i for i, b in enumerate(bits)}, hours=1.0, passes=100),
               _record(EMQ_FULL, {b: 94.0 for b in bits}, hours=5.0, passes=400)]
    table = gap_table(preset, records).set_index("metric")
    assert table.loc["mean_top1", "measured"] == "95.00"  # mean of 93..97
    assert table.loc["mean_top1", "gap"] == "1.54"  # 95.00 - 93.46
    assert table.loc["speedup", "measured"].startswith("5.00x time, 4.00x passes")
    assert table.loc["speedup", "gap"] == "-2.88"  # 5.00 - 7.88
    mbquant = gap_table(get_preset("mbquant-cifar100-resnet20"), [])
    assert (mbquant["published"] == UNVERIFIED).all() and (mbquant["gap"] == "n/a").all()


def test_shortened_schedule_scales_milestones():
    schedule = get_preset("anyprecision-cifar10-resnet20").schedule
    assert shortened(schedule, 20).milestones == (10, 15, 18)
    assert shortened(schedule, 200) is schedule
    budgeted = get_preset("claims-emq-selectors-digits").schedule
    # EMQ's TDDS run on digits: 3 bit-widths x (3 scoring epochs x 1,437 samples + 60 epochs x 287 coreset samples)
    assert budgeted.budget == 3 * (3 * 1437 + 60 * 287) == 64_593
    assert shortened(budgeted, 6).budget == pytest.approx(6_459.3, rel=1e-12)


def test_every_preset_claim_names_its_methods_and_the_example_claim_needs_fp():
    for name in list_presets():
        preset = get_preset(name)
        for claim in preset.claims:
            assert {m for m, _ in claim.refs()} <= {*preset.methods, FP}
            assert claim.name and claim.source
    (claim,) = get_preset("anyprecision-cifar10-resnet20").claims
    bits = (1, 2, 4, 8, 32)
    without_fp = [_record(AP, dict(zip(bits, (90.0, 93.0, 94.0, 93.0, 95.0))))]
    verdict = evaluate_all([claim], without_fp)[0]
    assert verdict.verdict == INCONCLUSIVE and verdict.effects[0].reason == "no fp record"
    with_fp = [*without_fp, _record("fp", {32: 93.8})]
    verdict = evaluate_all([claim], with_fp)[0]
    assert verdict.verdict == HOLDS and verdict.effects[0].mean == pytest.approx(-0.8)
