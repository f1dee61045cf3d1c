"""Interpolation: the paths themselves, their smoothness measure, and the measured stage."""
import shutil

import numpy as np
import pytest
import torch

from latentlab.interpolation import KINDS, compare, interpolate, step_lengths
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
        assert 0.1 <= scores["min_confidence"] <= scores["mean_confidence"] <= 1.0
        assert scores["frechet_distance"] > 0
        assert 1 / 9 - 1e-6 <= scores["pixel_step_mean"] <= scores["pixel_step_max"]
    verdict = result["verdict"]
    assert "more digit-like" in verdict and f"{result['real_codes']['mean_confidence']:.3f}" in verdict
    assert (run.figures / "interpolation.png").stat().st_size > 1000
    assert run.metrics()["interpolation"]["verdict"] == verdict
    # the same seed draws the same pairs: the numbers repeat
    again = Pipeline(run, config).run_stage("interpolation")["interpolation"]
    assert again["linear_noise"] == result["linear_noise"] and again["real_codes"] == result["real_codes"]
