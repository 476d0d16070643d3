"""Coreset selectors: each score equals its definition computed by hand on a made-up scoring run."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from harness.errors import ConfigError
from methods.quant.coreset import draw_coreset, sampling_probabilities, tdds_scores
from methods.quant.coreset_selectors import SELECTORS, get_selector, moderate_scores

# Three samples, three classes, three scoring epochs (rows sum to 1). Labels 0, 1, 2.
P = torch.tensor([
    [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]],
    [[0.25, 0.5, 0.25], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]],
    [[1.0, 0.0, 0.0], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]],
], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2])


def run(name: str) -> torch.Tensor:
    selector = get_selector(name)(3)
    for epoch in P:
        selector.add_epoch(epoch, LABELS)
    return selector.scores()


def test_el2n_is_the_mean_over_epochs_of_the_distance_to_the_one_hot_label():
    # sample 0 (label 0): epoch 1 (-0.5, .25, .25) -> sqrt(.375); epoch 2 (-.75, .5, .25) -> sqrt(.875); epoch 3 0
    # sample 1 (label 1): sqrt(.2^2 + .4^2 + .2^2) = sqrt(.24); sqrt(.01 + .04 + .01) = sqrt(.06); sqrt(.36+.64+.04)
    # sample 2 (label 2): sqrt(.01 + .01 + .04) = sqrt(.06); sqrt(.64 + .01 + .81) = sqrt(1.46); sqrt(.06)
    expected = torch.tensor([(math.sqrt(0.375) + math.sqrt(0.875) + 0.0) / 3,
                             (math.sqrt(0.24) + math.sqrt(0.06) + math.sqrt(1.04)) / 3,
                             (math.sqrt(0.06) + math.sqrt(1.46) + math.sqrt(0.06)) / 3], dtype=torch.float64)
    torch.testing.assert_close(run("el2n"), expected, rtol=1e-15, atol=0)


def test_entropy_is_of_the_last_epochs_softmax_with_0_log_0_as_0():
    expected = torch.tensor([0.0,
                             -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)),
                             -(2 * 0.1 * math.log(0.1) + 0.8 * math.log(0.8))], dtype=torch.float64)
    torch.testing.assert_close(run("entropy"), expected, rtol=1e-15, atol=0)


def test_forgetting_counts_learned_then_forgotten_events_and_ranks_unlearned_samples_first():
    # correct per epoch: sample 0 [T, F, T] -> 1 event; sample 1 [T, T, F] -> 1 event; sample 2 [T, F, T] -> 1
    assert torch.equal(run("forgetting"), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    selector = get_selector("forgetting")(4)
    labels = torch.tensor([0, 0, 0, 0])
    right, wrong = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
    by_sample = [[wrong, wrong, wrong, wrong],  # never learned -> 4 (the number of epochs)
                 [right, wrong, right, right],  # 1 event
                 [right, wrong, right, wrong],  # 2 events
                 [wrong, wrong, right, right]]  # learned late, never forgotten -> 0
    for epoch in range(4):
        selector.add_epoch(torch.stack([by_sample[s][epoch] for s in range(4)]), labels)
    assert torch.equal(selector.scores(), torch.tensor([4.0, 1.0, 2.0, 0.0], dtype=torch.float64))


def test_moderate_scores_peak_at_the_median_distance_to_the_class_centre():
    # class 0: features 0, 1, 2, 5 on a line -> centre 2, distances 2, 1, 0, 3, median (lower middle) 1
    # class 1: features 10, 12 -> centre 11, distances 1, 1, median 1
    features = torch.tensor([[0.0], [1.0], [2.0], [5.0], [10.0], [12.0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    assert torch.equal(moderate_scores(features, labels),
                       torch.tensor([-1.0, 0.0, -1.0, -2.0, 0.0, 0.0], dtype=torch.float64))


def test_tdds_selector_is_tdds():
    torch.testing.assert_close(run("tdds"), tdds_scores(P), rtol=0, atol=0)


def test_random_needs_no_scoring_and_draws_uniformly():
    selector = get_selector("random")
    assert not selector.needs_scoring
    probabilities = sampling_probabilities(selector(20).scores(), tau=0.5)
    assert torch.equal(probabilities, torch.full((20,), 1 / 20, dtype=torch.float64))
    counts = torch.zeros(20)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[draw_coreset(probabilities, 4, generator)] += 1
    # 8000 draws over 20 samples: chi-square against uniform, 19 degrees of freedom
    assert counts.sum() == 8000
    assert stats.chisquare(counts.numpy()).pvalue > 0.01


def test_selectors_registry_and_one_line_error():
    assert set(SELECTORS) == {"tdds", "random", "el2n", "entropy", "forgetting", "moderate"}
    with pytest.raises(ConfigError, match="unknown coreset selector 'gradnorm'; known: el2n, entropy, forgetting, "
                                          "moderate, random, tdds$"):
        get_selector("gradnorm")
