import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlab import classifier as judge_module
from latentlab import pixels as pixel_forms
from latentlab.classifier import (SHIPPED, features, features_and_proba, load_classifier, predict_proba, ship,
                                  shipped_judge, train_classifier)
from latentlab.cli import build_parser, resolve_config
from latentlab.config import QUICK, ClassifierConfig, make_config
from latentlab.context import Context
from latentlab.errors import LatentlabError
from latentlab.models import DigitClassifier
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run
from tests.conftest import tiny_config, trained_run
from tests.test_reliability import one_line, run_cli


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


def test_default_settings_on_the_shipped_mnist_take_the_shipped_judge(tmp_path):
    """No training: the run's checkpoint is the shipped file byte for byte, and its test accuracy is measured here
    (what scripts/ship_judge.py recorded, and the 99.2% issue 10 asks of the judge)."""
    config = make_config()
    config.device = "cpu"
    run = trained_run(tmp_path / "run", config, ["classifier"])
    assert (run.checkpoints / "classifier.pt").read_bytes() == (SHIPPED / "classifier.pt").read_bytes()
    section = run.metrics()["classifier"]
    assert section["shipped"]["git_commit"] and section["train_images"] == 55_000
    assert section["test_accuracy"] == section["shipped"]["test_accuracy"] >= 0.992
    records = json.loads((run.root / "stages.json").read_text())
    assert [r["files"] for r in records.values()] == [["checkpoints/classifier.pt", "test_features.pt"]]  # for --reuse


def test_quick_keeps_the_shipped_judge_and_shrinks_one_for_other_data():
    assert make_config(quick=True).classifier == ClassifierConfig()
    assert make_config(quick=True, data_dir="/elsewhere").classifier.epochs == 1


@pytest.mark.parametrize("extra, epochs", [([], 1), (["--set", "classifier.epochs=2"], 2)])
def test_quick_without_the_shipped_judge_trains_the_quick_one(extra, epochs):
    """--quick --set classifier.shipped=false trains a judge after all: the quick one, not the default's 3 epochs
    on 55k images; a judge setting given with --set still wins."""
    args = build_parser().parse_args(["run", "--quick", "--set", "classifier.shipped=false", *extra])
    judge = resolve_config(args).classifier
    assert (judge.shipped, judge.epochs, judge.train_limit) == (False, epochs, QUICK["classifier"]["train_limit"])
    assert resolve_config(build_parser().parse_args(["run", "--set", "classifier.shipped=false"])).classifier \
        == dataclasses.replace(ClassifierConfig(), shipped=False)  # without --quick: the default settings


JUDGE_SETTINGS = {"epochs": st.integers(1, 5), "batch_size": st.sampled_from([64, 128, 256]),
                  "lr": st.sampled_from([1e-3, 5e-3, 1e-2]), "width": st.sampled_from([8, 16, 32]),
                  "train_limit": st.sampled_from([0, 1000]), "seed": st.integers(0, 3)}


@settings(max_examples=40, deadline=None)
@given(st.fixed_dictionaries({}, optional=JUDGE_SETTINGS), st.sampled_from([None, "/some/other/data"]),
       st.booleans())
def test_the_shipped_judge_serves_only_the_settings_it_was_made_with(changes, data_dir, shipped):
    cfg = dataclasses.replace(ClassifierConfig(), shipped=shipped, **changes)
    ctx = SimpleNamespace(config=SimpleNamespace(data_dir=data_dir))
    taken = shipped_judge(ctx, cfg)
    same = dataclasses.replace(cfg, shipped=True) == ClassifierConfig()
    assert (taken is not None) == (same and data_dir is None and shipped)


def test_ship_round_trip(gan_run, tmp_path):
    """scripts/ship_judge.py's writer: what it ships is what a run with those settings takes."""
    config = tiny_config()
    record = ship(gan_run, config.classifier, tmp_path / "judge")
    made, taken = shipped_judge(SimpleNamespace(config=config), config.classifier, tmp_path / "judge")
    assert made == (gan_run.checkpoints / "classifier.pt").read_bytes() and taken == record
    assert record["section"]["epochs"] == config.classifier.epochs and "test_accuracy" not in record["section"]


@pytest.mark.parametrize("damage, fragment", [
    (lambda folder: (folder / "classifier.pt").write_bytes((folder / "classifier.pt").read_bytes()[:-10]),
     "classifier.pt: damaged (not the file shipped); reinstall latentlab"),
    (lambda folder: (folder / "classifier.json").write_text("{"), "the shipped judge cannot be read"),
    (lambda folder: (folder / "classifier.json").write_text("[]"), "the shipped judge cannot be read"),
    (lambda folder: (folder / "classifier.json").write_text(json.dumps(
        {k: v for k, v in json.loads((folder / "classifier.json").read_text()).items() if k != "section"})),
     "the shipped judge cannot be read"),
    (lambda folder: (folder / "classifier.pt").unlink(), "the shipped judge cannot be read"),
])
def test_a_damaged_shipped_judge_is_a_one_line_error(damage, fragment, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(SHIPPED, tmp_path / "judge")
    damage(folder)
    monkeypatch.setattr(judge_module, "SHIPPED", folder)
    code, err = run_cli(["train-classifier", "--run", tmp_path / "run", "--device", "cpu"], capsys)
    assert code == 2 and fragment in one_line(err) and "classifier.shipped=false" in err
    assert not (tmp_path / "run" / "checkpoints" / "classifier.pt").exists()


def test_ship_script_refuses_a_judge_of_other_settings(gan_run):
    """scripts/ship_judge.py ships only a judge trained with the default settings on the shipped MNIST."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "ship_judge.py"
    before = (SHIPPED / "classifier.pt").read_bytes()
    result = subprocess.run([sys.executable, str(script), "--run", str(gan_run.root)], capture_output=True, text=True)
    assert result.returncode != 0 and "not a judge trained here with the default settings" in result.stderr
    assert (SHIPPED / "classifier.pt").read_bytes() == before
