"""EMQ's bit-wise scoring phase (TDDS): each bit-width scored in isolation, the model left untouched, pruning 0."""

from __future__ import annotations

from collections import Counter

import torch

from methods.emq import EMQ
from tests.methods.test_emq import build, context, small_train


def test_bitwise_scoring_trains_each_bit_width_in_isolation(synthetic, monkeypatch):
    train = small_train(synthetic)
    method, model = build(synthetic, (2, 8), score_epochs=3)
    ctx = context(synthetic, (2, 8))
    method.prepare(model, train, ctx)
    reference = method.scores.clone()
    assert method.score_bits == (2, 8) and reference.shape == (2, 64) and bool((reference > 0).all())
    assert ctx.passes == Counter({2: 3 * 64, 8: 3 * 64})  # the scoring phase counts in EMQ's totals

    # Give the 2-bit scoring run other data (another order and augmentation stream): 8-bit scores must not move.
    original = EMQ.scoring_seed
    monkeypatch.setattr(EMQ, "scoring_seed", staticmethod(lambda seed, b: original(seed, b) + (1 if b == 2 else 0)))
    other, other_model = build(synthetic, (2, 8), score_epochs=3)
    other.prepare(other_model, train, context(synthetic, (2, 8)))
    assert torch.equal(other.scores[1], reference[1])
    assert not torch.allclose(other.scores[0], reference[0])


def test_prepare_leaves_the_model_untouched_and_batchwise_scores_in_one_joint_run(synthetic, monkeypatch):
    train = small_train(synthetic, 40)
    calls = []

    def fake_run(self, initial, train_set, bits, stream_seed, ctx):
        calls.append(bits)
        return {b: torch.arange(len(train_set), dtype=torch.float32) * b for b in bits}

    monkeypatch.setattr(EMQ, "scoring_run", fake_run)
    for scoring, expected_calls in (("bitwise", [(2,), (4,), (8,)]), ("batchwise", [(2, 4, 8)])):
        calls.clear()
        method, model = build(synthetic, (2, 4, 8), scoring=scoring)
        method.prepare(model, train, context(synthetic, (2, 4, 8)))
        assert calls == expected_calls
        assert torch.equal(method.scores[2], torch.arange(40, dtype=torch.float32) * 8)

    method, model = build(synthetic, (2, 8), score_epochs=3)
    monkeypatch.undo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.prepare(model, small_train(synthetic, 32), context(synthetic, (2, 8)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_zero_is_the_full_data_baseline(synthetic):
    method, model = build(synthetic, (2, 8), prune=0.0)
    ctx = context(synthetic, (2, 8))
    method.prepare(model, small_train(synthetic), ctx)
    assert method.scores is None and ctx.passes == Counter()
    assert method.epoch_indices(0, small_train(synthetic), (2, 8)) is None and method.artifacts() == {}
