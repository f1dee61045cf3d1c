import numpy as np
import pytest

from latentlab.metrics import frechet_distance, precision_recall


def gaussian(n, dim, *, mean=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(mean, scale, size=(n, dim))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = gaussian(500, 8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_shifted_copy_is_squared_shift():
    # same covariance exactly: the distance is ||mu_a - mu_b||^2 and nothing else
    a = gaussian(400, 6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    assert frechet_distance(a, a + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)


def test_frechet_distance_matches_closed_form_for_scaled_covariance():
    # S_b = s^2 S_a: tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2) = (1 - s)^2 tr(S_a)
    a = gaussian(300, 5, seed=1) @ np.random.default_rng(2).normal(size=(5, 5))
    a -= a.mean(axis=0)  # so that b's mean is exactly 1 in every coordinate
    b = 3.0 * a + 1.0
    expected = 5 * 1.0 + (1 - 3.0) ** 2 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_symmetric_and_grows_with_the_shift():
    a, b = gaussian(300, 4, seed=3), gaussian(300, 4, scale=2.0, seed=4)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    near, far = frechet_distance(a, a + 0.5), frechet_distance(a, a + 2.0)
    assert 0 < near < far


def test_frechet_distance_of_independent_samples_of_one_gaussian_is_small():
    a, b = gaussian(4000, 4, seed=5), gaussian(4000, 4, seed=6)
    assert frechet_distance(a, b) < 0.02 < frechet_distance(a, gaussian(4000, 4, mean=0.5, seed=7))


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(gaussian(10, 3), gaussian(10, 4))


def test_precision_recall_of_identical_sets_is_one():
    a = gaussian(300, 5)
    assert precision_recall(a, a, k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_of_a_far_set_is_zero():
    a = gaussian(300, 5)
    assert precision_recall(a, a + 100.0, k=3) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_separate_quality_from_coverage():
    real = gaussian(1000, 2, seed=8)
    # samples from a quarter of the real spread: realistic (high precision) but covering little (low recall)
    collapsed = gaussian(1000, 2, scale=0.25, seed=9)
    scores = precision_recall(real, collapsed, k=3)
    assert scores["precision"] > 0.95
    assert scores["recall"] < 0.5
    # a shifted set loses both
    shifted = precision_recall(real, real + 3.0, k=3)
    assert shifted["precision"] < 0.5 and shifted["recall"] < 0.5


def test_precision_recall_does_not_depend_on_the_batch_size():
    real, fake = gaussian(250, 3, seed=10), gaussian(230, 3, mean=0.3, seed=11)
    assert precision_recall(real, fake, batch_size=7) == precision_recall(real, fake, batch_size=1000)
