import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentlab import pixels as pixel_forms
from latentlab.classifier import features, features_and_proba, load_classifier, predict_proba, train_classifier
from latentlab.config import ClassifierConfig
from latentlab.context import Context
from latentlab.errors import LatentlabError
from latentlab.models import DigitClassifier
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run
from tests.conftest import tiny_config, trained_run


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = DigitClassifier(width=8)
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert (model.eval()(images).argmax(dim=1) == labels).all()


def test_uint8_and_float_images_give_the_same_outputs():
    model = DigitClassifier(width=8).eval()
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    as_float = torch.from_numpy(pixels).float().div(255).unsqueeze(1)
    np.testing.assert_allclose(predict_proba(model, pixels), predict_proba(model, as_float), atol=1e-6)
    feats = features(model, pixels, batch_size=2)
    assert feats.shape == (5, 128) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    np.testing.assert_allclose(feats, features(model, as_float), atol=1e-5)
    probs = predict_proba(model, as_float)
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(LatentlabError, match="uint8"):
        pixel_forms.to_float(pixels.astype(np.int64))


def test_one_pass_gives_the_same_features_and_probabilities_as_two():
    torch.manual_seed(0)
    model = DigitClassifier(width=8).eval()
    pixels = np.random.default_rng(1).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    feats, proba = features_and_proba(model, pixels, batch_size=3)
    np.testing.assert_allclose(feats, features(model, pixels), atol=1e-6)  # batches of 3 vs 1000: rounding only
    np.testing.assert_allclose(proba, predict_proba(model, pixels), atol=1e-6)


def test_learns_digits_from_a_small_slice(tiny_run):
    ctx = Context(run=tiny_run, config=tiny_config())
    cfg = ClassifierConfig(epochs=2, width=8, lr=5e-3)
    model, history = train_classifier(cfg, ctx.images("train")[:3000], ctx.labels("train")[:3000],
                                      ctx.images("val")[:1000], ctx.labels("val")[:1000], seed=0)
    assert len(history["val_accuracy"]) == 2
    assert history["val_accuracy"][-1] > 0.85  # 10% is chance
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_stage_saves_a_checkpoint_that_loads(tiny_run, tmp_path):
    run = Run(shutil.copytree(tiny_run.root, tmp_path / "run"))
    Pipeline(run, tiny_config()).run_stage("classifier")
    section = run.metrics()["classifier"]
    assert {"test_accuracy", "val_accuracy", "epochs", "train_seconds", "feature_dim"} <= set(section)
    assert 0.5 < section["test_accuracy"] <= 1.0
    # the checkpoint holds the model the stage scored
    ctx = Context(run=run, config=tiny_config())
    predicted = predict_proba(load_classifier(run), ctx.images("test")).argmax(axis=1)
    assert np.mean(predicted == ctx.labels("test")) == pytest.approx(section["test_accuracy"])


def test_runs_of_other_seeds_train_the_same_judge_on_its_own_split(tmp_path):
    """The judge's seed is its own (classifier.seed): a run of seed 1 trains the judge a run of seed 0 trains, on
    that seed's split, while another classifier.seed trains another judge."""
    other_judge = tiny_config()
    other_judge.classifier.seed = 1
    judges = {}
    for name, config in (("seed0", tiny_config()), ("seed1", tiny_config(seed=1)), ("judge1", other_judge)):
        run = trained_run(tmp_path / name, config, ["classifier"])
        judges[name] = load_classifier(run).state_dict()
        assert run.metrics()["classifier"]["seed"] == config.classifier.seed
    assert all(torch.equal(judges["seed0"][k], judges["seed1"][k]) for k in judges["seed0"])
    assert not all(torch.equal(judges["seed0"][k], judges["judge1"][k]) for k in judges["seed0"])


def test_missing_checkpoint_names_the_command(tmp_path):
    with pytest.raises(LatentlabError, match="latentlab train-classifier --run"):
        load_classifier(Run(tmp_path, create=True))
