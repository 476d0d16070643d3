"""TDDS scores against hand computations; temperature sampling against its probabilities (chi-square)."""

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from methods.quant.coreset import (
    TDDSRecorder,
    coreset_size,
    draw_coreset,
    sampling_probabilities,
    tdds_scores,
)


def test_tdds_of_a_hand_made_sequence_equals_the_hand_computation():
    # Sample 0: p = [.5, .5] -> [.8, .2] -> [.6, .4]; sample 1: [.9, .1] -> [.9, .1] -> [.5, .5].
    probabilities = torch.tensor([[[0.5, 0.5], [0.9, 0.1]],
                                  [[0.8, 0.2], [0.9, 0.1]],
                                  [[0.6, 0.4], [0.5, 0.5]]], dtype=torch.float64)
    # d_1 = .8 ln(.8/.5) + .2 |ln(.2/.5)| = 0.5592610497714195; d_2 = .6 |ln(.6/.8)| + .4 ln(.4/.2) = 0.4498681156950467
    # K = T - 1 = 2: one window, R = sqrt((d_1 - m)^2 + (d_2 - m)^2) = |d_1 - d_2| / sqrt(2); S = 0.9 R
    sample0 = 0.9 * abs(0.5592610497714195 - 0.4498681156950467) / math.sqrt(2)
    # sample 1: d_1 = 0, d_2 = .5 |ln(.5/.9)| + .5 ln(.5/.1) = 1.0986122886681096
    sample1 = 0.9 * 1.0986122886681096 / math.sqrt(2)
    torch.testing.assert_close(tdds_scores(probabilities), torch.tensor([sample0, sample1], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_tdds_weighs_later_windows_more():
    # One sample, T = 4: [.9, .1] -> [.9, .1] -> [.5, .5] -> [.9, .1]; d = [0, 1.0986122886681096, 0.68995178965531]
    sequence = [[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.9, 0.1]]
    probabilities = torch.tensor(sequence, dtype=torch.float64).unsqueeze(1)
    d = [0.0, 1.0986122886681096, 0.6899517896553172]
    r0, r1 = abs(d[0] - d[1]) / math.sqrt(2), abs(d[1] - d[2]) / math.sqrt(2)  # windows of K = 2, stride 1
    expected = 0.9 * 0.1 * r0 + 0.9 * r1  # beta (1 - beta)^(last - k)
    assert tdds_scores(probabilities, window=2).item() == pytest.approx(expected, rel=1e-6)
    assert tdds_scores(probabilities, window=2, beta=0.5).item() == pytest.approx(0.25 * r0 + 0.5 * r1, rel=1e-6)


def test_recorder_keeps_one_epoch_and_gives_the_same_scores():
    torch.manual_seed(0)
    probabilities = torch.softmax(torch.randn(6, 50, 10), dim=2)
    recorder = TDDSRecorder()
    for epoch in probabilities:
        recorder.add_epoch(epoch)
    torch.testing.assert_close(recorder.scores(), tdds_scores(probabilities))
    torch.testing.assert_close(recorder.scores(window=3), tdds_scores(probabilities, window=3))


def test_sampling_probabilities_hand_values():
    scores = torch.tensor([1.0, 3.0, 5.0])  # min-max -> [0, 0.5, 1]
    softmax = torch.tensor([1.0, math.e, math.e**2]) / (1 + math.e + math.e**2)  # exp(s / 0.5)
    torch.testing.assert_close(sampling_probabilities(scores, 0.5), softmax.double())
    power = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64) / 1.25  # s^(1 / 0.5), up to the 1e-12 floor
    torch.testing.assert_close(sampling_probabilities(scores, 0.5, "power"), power, rtol=0, atol=1e-11)
    assert torch.equal(sampling_probabilities(torch.full((4,), 2.0), 0.5), torch.full((4,), 0.25).double())


SCORES = torch.tensor([0.3, 2.0, 1.1, 0.0, 0.7, 1.6, 2.4, 0.9, 1.3, 0.5])


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_single_draw_frequencies_match_softmax_probabilities(tau):
    probabilities = sampling_probabilities(SCORES, tau)
    size = coreset_size(len(SCORES), 0.9)  # round(0.1 * 10) = 1
    assert size == 1
    generator = torch.Generator().manual_seed(123)
    draws = 5_000
    counts = torch.zeros(len(SCORES))
    for _ in range(draws):
        counts[draw_coreset(probabilities, size, generator)] += 1
    result = chisquare(counts.numpy(), (probabilities * draws).numpy())
    assert result.pvalue > 0.01


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_pair_draws_follow_successive_sampling_without_replacement(tau):
    scores = SCORES[:6]
    p = sampling_probabilities(scores, tau)
    size = coreset_size(6, 0.7)  # round(0.3 * 6) = 2 (1.8 rounds up)
    assert size == 2
    pairs = list(itertools.combinations(range(6), 2))
    # P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j): either order of two successive draws
    expected = torch.tensor([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
    assert expected.sum().item() == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(7)
    draws = 5_000
    counts = torch.zeros(len(pairs))
    index = {pair: k for k, pair in enumerate(pairs)}
    for _ in range(draws):
        chosen = draw_coreset(p, size, generator).tolist()
        assert len(set(chosen)) == 2
        counts[index[tuple(sorted(chosen))]] += 1
    result = chisquare(counts.numpy(), (expected * draws).numpy())
    assert result.pvalue > 0.01


def test_a_draw_has_no_duplicates_and_the_rounded_size():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for prune, size in ((0.8, 200), (0.6, 400), (0.0, 1000)):
        chosen = draw_coreset(sampling_probabilities(scores, 0.5), coreset_size(1000, prune), generator)
        assert len(chosen) == size and len(torch.unique(chosen)) == size
    assert coreset_size(37, 0.8) == 7  # round(7.4)
    assert coreset_size(10, 0.99) == 1  # never empty
