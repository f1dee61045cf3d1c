"""Interpolation: the paths themselves, their smoothness measure, and the measured stage."""
import shutil

import numpy as np
import pytest
import torch

from latentlab.classifier import features, load_classifier, predict_proba
from latentlab.context import Context
from latentlab.interpolation import KINDS, compare, interpolate, score_paths, step_lengths
from latentlab.metrics import Reference
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run
from tests.conftest import tiny_config


def test_linear_path_runs_evenly_from_a_to_b():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([4.0, -2.0])
    path = interpolate(a, b, 5, "linear")
    assert path.shape == (5, 2)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert torch.allclose(path[2], (a + b) / 2)


def test_spherical_path_keeps_the_norm_and_the_endpoints():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=gen)
    b = b * a.norm() / b.norm()  # equal norms: slerp stays on that sphere, the line dips inside it
    path = interpolate(a, b, 10, "spherical")
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert torch.allclose(path.norm(dim=1), a.norm().expand(10), rtol=1e-4)
    assert interpolate(a, b, 10, "linear")[5].norm() < 0.9 * a.norm()
    # parallel vectors: no circle to follow, the line is used
    assert torch.allclose(interpolate(a, 2 * a, 3, "spherical")[1], 1.5 * a)
    with pytest.raises(ValueError):
        interpolate(a, b, 3, "cubic")


def test_step_lengths_are_relative_to_the_endpoint_distance():
    even = np.linspace(0, 1, 10)[None, :, None] * np.array([3.0, 4.0])  # a straight, even path
    assert step_lengths(even)["step_mean"] == pytest.approx(1 / 9)
    assert step_lengths(even)["step_max"] == pytest.approx(1 / 9)
    jumpy = np.array([[[0.0], [0.0], [0.0], [1.0]]])                       # all the way in one step
    assert step_lengths(jumpy) == pytest.approx({"step_mean": 1 / 3, "step_max": 1.0})


def test_compare_counts_a_difference_only_beyond_twice_its_standard_error():
    def path(confidence, fd, se):
        return {"mean_confidence": confidence, "mean_confidence_se": se, "min_confidence": confidence,
                "min_confidence_se": se, "frechet_distance": fd, "frechet_distance_se": se}
    real = path(0.90, 50.0, 0.01)
    assert compare(path(0.95, 40.0, 0.01), real) == {"mean_confidence": 1, "min_confidence": 1, "frechet_distance": 1}
    assert compare(path(0.85, 60.0, 0.01), real) == {"mean_confidence": -1, "min_confidence": -1, "frechet_distance": -1}
    # the same differences with large standard errors are noise
    assert set(compare(path(0.95, 40.0, 10.0), path(0.90, 50.0, 10.0)).values()) == {0}


def test_stage_scores_every_kind_and_states_a_verdict(gan_run, tmp_path):
    run = Run(shutil.copytree(gan_run.root, tmp_path / "run"))
    config = tiny_config()
    config.interpolation.pairs = 6
    sections = Pipeline(run, config).run_stage("interpolation")
    result = sections["interpolation"]
    assert result["pairs"] == 6 and result["steps"] == 10 and result["in_between_images"] == 6 * 8
    for kind in KINDS:
        scores = result[kind]
        assert scores["frechet_distance"] > 0 and scores["frechet_distance_se"] > 0
    verdict = result["verdict"]
    assert "more digit-like" in verdict and f"{result['real_codes']['mean_confidence']:.3f}" in verdict
    assert (run.figures / "interpolation.png").stat().st_size > 1000
    assert run.metrics()["interpolation"]["verdict"] == verdict
    # the same seed draws the same pairs: the numbers repeat
    again = Pipeline(run, config).run_stage("interpolation")["interpolation"]
    assert again["linear_noise"] == result["linear_noise"] and again["real_codes"] == result["real_codes"]


def test_path_scores_are_the_classifier_readings_of_the_in_between_images(gan_run):
    """Known paths (pixel blends of real test digits): the scores equal what the classifier reads directly."""
    ctx = Context(run=gan_run, config=tiny_config())
    classifier = load_classifier(gan_run)
    test_images = ctx.images("test")
    pairs, steps = 5, 6
    t = torch.linspace(0, 1, steps)[None, :, None, None, None]
    a, b = test_images[:pairs, None], test_images[pairs:2 * pairs, None]
    paths = (1 - t) * a + t * b                                            # (pairs, steps, 1, 28, 28)
    test = Reference(features(classifier, test_images))
    scores = score_paths(paths, classifier, test, np.random.default_rng(0), resamples=5)
    inner = paths[:, 1:-1].reshape(-1, 1, 28, 28)
    confidence = predict_proba(classifier, inner).max(1).reshape(pairs, steps - 2)
    assert scores["mean_confidence"] == pytest.approx(confidence.mean(), abs=1e-5)
    assert scores["min_confidence"] == pytest.approx(confidence.min(1).mean(), abs=1e-5)
    assert scores["frechet_distance"] == pytest.approx(test.frechet_distance(features(classifier, inner)), rel=1e-6)
    # an even blend in pixels moves the same amount at every step
    assert scores["pixel_step_mean"] == pytest.approx(1 / (steps - 1), rel=1e-4)
    assert scores["pixel_step_max"] == pytest.approx(1 / (steps - 1), rel=1e-4)
