import json
import shutil

import numpy as np
import pytest
import torch

from latentlab import cli
from latentlab.classifier import load_classifier
from latentlab.checks import check_config
from latentlab.config import validate
from latentlab.context import Context
from latentlab.errors import LatentlabError
from latentlab.evaluate import (conditional_quality, embed, fit_gmm, floors, unconditional_quality, verdict)
from latentlab.metrics import Reference
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def evaluated_run(gan_run, tmp_path_factory):
    """conftest's gan_run with the baselines (all the evaluation reads), evaluated."""
    run = Run(shutil.copytree(gan_run.root, tmp_path_factory.mktemp("evaluated") / "run"))
    pipeline = Pipeline(run, tiny_config())
    pipeline.run_stage("baselines")
    pipeline.run_stage("evaluation")
    return run


def test_evaluation_writes_every_section_and_keeps_the_training_facts(evaluated_run):
    metrics = evaluated_run.metrics()
    for name in ("gan", "cgan"):
        assert metrics[name]["steps"] == 50  # written by the training stage, kept by the merge
    gan, cgan = metrics["gan"]["quality"], metrics["cgan"]["quality"]
    assert {"frechet_distance", "precision", "recall", "class_histogram", "samples"} <= set(gan)
    assert len(gan["class_histogram"]) == 10 and sum(gan["class_histogram"]) == pytest.approx(1.0)
    assert gan["samples"] == 200
    assert {"accuracy", "accuracy_per_digit", "min_digit_accuracy", "frechet_distance", "precision",
            "recall"} <= set(cgan)
    assert sorted(cgan["accuracy_per_digit"]) == [str(d) for d in range(10)]
    # each digit was asked for equally often, so the overall accuracy is the mean of the per-digit ones
    assert cgan["accuracy"] == pytest.approx(np.mean(list(cgan["accuracy_per_digit"].values())))
    baselines = metrics["baselines"]
    assert {"components", "covariance_type", "frechet_distance", "precision", "recall",
            "class_histogram"} <= set(baselines["gmm"])
    assert len(baselines["gmm_per_digit"]["components"]) == 10
    assert {"accuracy", "accuracy_per_digit", "min_digit_accuracy", "frechet_distance"} <= set(baselines["gmm_per_digit"])
    evaluation = metrics["evaluation"]
    assert evaluation["samples"] == 200 and evaluation["k"] == 3
    assert {"train_vs_test_frechet_distance", "reconstruction_frechet_distance", "reconstruction_precision",
            "reconstruction_recall", "reconstruction_accuracy"} <= set(evaluation["floors"])
    assert set(evaluation["targets"]) == {
        "cgan_accuracy_at_least_0.99", "cgan_min_digit_at_least_0.97", "cgan_fd_within_1.5x_reconstruction_floor",
        "recall_at_least_0.5", "gan_recall_at_least_0.5", "gan_beats_gmm", "cgan_beats_gmm_per_digit"}
    assert all(isinstance(v, bool) for v in evaluation["targets"].values())
    assert evaluation["targets"]["gan_beats_gmm"] == (gan["frechet_distance"] < baselines["gmm"]["frechet_distance"])
    assert f"{gan['frechet_distance']:.2f}" in evaluation["verdict"]
    for figure in ("evaluation_frechet", "evaluation_digit_accuracy", "baseline_gmm_samples",
                   "baseline_gmm_per_digit_samples"):
        assert (evaluated_run.figures / f"{figure}.png").stat().st_size > 1000


def test_real_images_score_better_than_reconstructions_and_noise(gan_run):
    ctx = Context(run=gan_run, config=tiny_config())
    classifier = load_classifier(gan_run)
    real = Reference(embed(classifier, ctx.images("test"))[0], k=3)
    floor = floors(ctx, classifier, real, 500)
    noise = np.random.default_rng(0).integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    noise_quality = unconditional_quality(classifier, real, noise)
    # real training digits look like test digits; the tiny AE's blurry reconstructions and noise do not
    assert floor["train_vs_test_frechet_distance"] < 0.2 * floor["reconstruction_frechet_distance"]
    assert floor["train_vs_test_frechet_distance"] < 0.2 * noise_quality["frechet_distance"]
    assert floor["train_vs_test_precision"] > 0.7 and floor["train_vs_test_recall"] > 0.7
    assert noise_quality["precision"] < 0.2 and noise_quality["recall"] < 0.1


def test_conditional_accuracy_counts_samples_classified_as_asked(gan_run):
    ctx = Context(run=gan_run, config=tiny_config())
    classifier = load_classifier(gan_run)
    images, labels = ctx.images("test")[:500], ctx.labels("test")[:500]
    features, predicted = embed(classifier, ctx.images("test"))
    real = Reference(features, k=3)
    right = conditional_quality(classifier, real, images, labels)
    assert right["accuracy"] == pytest.approx(np.mean(predicted[:500] == labels))
    wrong = conditional_quality(classifier, real, images, (labels + 1) % 10)
    assert wrong["accuracy"] < 0.2 < 0.7 < right["accuracy"]
    for d in range(10):  # per digit: the share of the images asked to be d that read as d
        assert right["accuracy_per_digit"][str(d)] == pytest.approx(np.mean(predicted[:500][labels == d] == d))


def test_the_test_reference_is_made_once_per_classifier_checkpoint(gan_run, tmp_path):
    """The baselines and the evaluation share the test images' features while the classifier is the same one."""
    import os

    from latentlab.evaluate import reference_of_test_images

    run = Run(shutil.copytree(gan_run.root, tmp_path / "r", ignore=shutil.ignore_patterns(".lock")))
    ctx = Context(run, tiny_config())
    classifier = load_classifier(run)
    first = reference_of_test_images(ctx, classifier)
    assert reference_of_test_images(ctx, classifier) is first
    assert torch.equal(first.features, embed(classifier, ctx.images("test"))[0])
    checkpoint = run.checkpoints / "classifier.pt"
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 1_000_000))  # retrained
    assert reference_of_test_images(ctx, classifier) is not first


def test_the_classifier_stage_leaves_the_test_reference_for_the_stages_after_it(gan_run, tmp_path, monkeypatch):
    """The classifier stage writes the test images' features and k-NN radii (test_features.pt); a later process
    reads them instead of passing the test images through the judge again, and they are what it would make."""
    from latentlab import classifier as judge
    from latentlab.metrics import knn_radii

    run = Run(shutil.copytree(gan_run.root, tmp_path / "r", ignore=shutil.ignore_patterns(".lock")))
    assert (run.root / "test_features.pt").exists()
    ctx = Context(run, tiny_config())
    made = embed(load_classifier(run), ctx.images("test"))[0]
    monkeypatch.setattr(judge, "features", lambda *a, **k: pytest.fail("the judge ran over the test images again"))
    real = judge.reference_of_test_images(ctx, load_classifier(run))
    assert torch.equal(real.features, made) and real._radii is not None  # the radii came with them
    assert torch.equal(real.radii, knn_radii(made, ctx.config.evaluation.k))


@pytest.mark.parametrize("fault", ["damaged", "another judge", "another k"])
def test_a_saved_test_reference_serves_only_its_own_judge_and_k(gan_run, tmp_path, monkeypatch, fault):
    """A damaged file, or one of another judge, is made anew from the images; another k keeps the features and
    makes the radii for that k. Never an error: the file is a cache."""
    from latentlab import classifier as judge
    from latentlab.metrics import knn_radii

    run = Run(shutil.copytree(gan_run.root, tmp_path / "r", ignore=shutil.ignore_patterns(".lock")))
    config = tiny_config()
    saved = run.root / "test_features.pt"
    if fault == "damaged":
        saved.write_bytes(saved.read_bytes()[:1000])
    elif fault == "another judge":  # a retrained judge: other weights, so another checkpoint digest
        checkpoint = torch.load(run.checkpoints / "classifier.pt", weights_only=True)
        checkpoint["state_dict"]["head.1.bias"] += 1.0
        run.save_checkpoint("classifier", checkpoint)
    else:
        config.evaluation.k = 5
    ctx = Context(run, config)
    classifier = load_classifier(run)
    calls = []
    original = judge.features
    monkeypatch.setattr(judge, "features", lambda *a, **k: calls.append(1) or original(*a, **k))
    real = judge.reference_of_test_images(ctx, classifier)
    monkeypatch.undo()  # the checks below pass the test images through the real judge
    assert len(calls) == (0 if fault == "another k" else 1)
    assert torch.equal(real.features, embed(classifier, ctx.images("test"))[0])
    assert torch.equal(real.radii, knn_radii(real.features, config.evaluation.k))


def test_gmm_fits_the_modes_and_scores_validation():
    rng = np.random.default_rng(0)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    draw = lambda n: centres[rng.integers(0, 3, n)] + rng.normal(size=(n, 2))  # noqa: E731
    train, val = draw(900), draw(300)
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    one, one_choice = fit_gmm(train, val, 1, seed=0)
    three, three_choice = fit_gmm(train, val, 3, seed=0)
    assert three_choice["components"] == 3 == three.n_components and three_choice["fitted_codes"] == 900
    assert three_choice["val_log_likelihood"] > one_choice["val_log_likelihood"] + 0.5
    found = three.means_[np.argsort(three.means_[:, 0])]
    assert np.allclose(found, centres[np.argsort(centres[:, 0])], atol=0.3)


def test_verdict_says_plainly_when_the_gans_lose():
    def scores(fd, accuracy=0.99):
        return {"frechet_distance": fd, "accuracy": accuracy}
    floor = {"train_vs_test_frechet_distance": 0.5, "reconstruction_frechet_distance": 4.0,
             "train_reconstruction_frechet_distance": 5.0}
    losing = verdict(scores(9.0), scores(8.0), {"gmm": scores(7.0), "gmm_per_digit": scores(6.0)}, floor)
    assert losing.startswith("The GANs do not beat the Gaussian mixture")
    assert "9.00" in losing and "7.00" in losing and "4.00" in losing
    # the distance target in scale: 1.5 x 4.00, and what exact codes reach (5.00 = 1.25x)
    assert "is 6.00" in losing and "scores 5.00 (1.25x)" in losing
    winning = verdict(scores(5.0), scores(4.5), {"gmm": scores(7.0), "gmm_per_digit": scores(6.0)}, floor)
    assert winning.startswith("Both GANs beat")
    mixed = verdict(scores(5.0), scores(8.0), {"gmm": scores(7.0), "gmm_per_digit": scores(6.0)}, floor)
    assert "conditional GAN does not" in mixed


def test_evaluate_without_a_classifier_is_a_one_line_error(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run.root, tmp_path / "run")
    assert cli.main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentlab: error:") and "train-classifier" in err and "Traceback" not in err


def test_settings_are_checked():
    config = tiny_config()
    config.evaluation.samples = 20_000  # more than the test images: a limit of the data, checked with it
    with pytest.raises(LatentlabError, match="evaluation.samples"):
        check_config(config)
    config = tiny_config()
    config.classifier.lr = 0.0
    with pytest.raises(LatentlabError, match="classifier.lr"):
        validate(config)


def test_evaluate_makes_the_missing_baselines_first(gan_run, tmp_path, capsys):
    """The floors and mixtures are their own stage, run beside the generators; `evaluate` on a run without them
    makes them first, and the evaluation stage alone refuses with one line instead of a KeyError."""
    run = Run(shutil.copytree(gan_run.root, tmp_path / "run"))
    assert "baselines" not in json.loads((run.root / "stages.json").read_text()) and "baselines" not in run.metrics()
    with pytest.raises(LatentlabError, match="baselines are missing; `latentlab evaluate"):
        Pipeline(run, tiny_config()).run_stage("evaluation")
    assert cli.main(["evaluate", "--run", str(run.root)]) == 0
    assert "baselines first" in capsys.readouterr().out
    metrics = run.metrics()
    assert {"gmm", "gmm_per_digit"} <= set(metrics["baselines"])
    assert metrics["evaluation"]["floors"]["train_reconstruction_frechet_distance"] > 0
    assert {"baselines", "evaluation"} <= set(json.loads((run.root / "stages.json").read_text()))


def test_a_report_on_other_data_says_class_where_mnist_says_digit(evaluated_run, tmp_path):
    """With the evaluation's tables in it (metric names such as gmm_per_digit, figure captions), a report on
    other data says "class"; the figure paths keep the files' names, so every figure is still found."""
    import re

    from latentlab.report import write_report

    run = shutil.copytree(evaluated_run.root, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (tmp_path / "fashion-mnist").mkdir()
    config["data_dir"] = str(tmp_path / "fashion-mnist")
    (run / "config.json").write_text(json.dumps(config))
    text = write_report(run)[0].read_text().split("## Settings")[0]
    assert "gmm_per_class" in text and "baseline_gmm_per_digit_samples.png" in text
    assert "digit" not in re.sub(r"\]\(figures/[^)]*\)", "]", text)
    assert all((run / path).is_file() for path in re.findall(r"\]\((figures/[^)]*)\)", text))
