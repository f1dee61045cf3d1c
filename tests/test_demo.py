"""The functions behind the web demo, called directly: shapes, the digit asked for, bad values refused."""
import importlib.util
import shutil
import socket

import numpy as np
import pytest
import torch

from latentlab import demo
from latentlab.autoencoder import decode, encode
from latentlab.classifier import predict_proba
from latentlab.cli import main
from latentlab.errors import LatentlabError

# the demo's run fixture trains every model (about a minute on 2 cores): `-m 'not slow'` leaves these out
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(demo_run):
    loaded = demo.load_models(demo_run.root)
    yield loaded
    shutil.rmtree(loaded.downloads, ignore_errors=True)


def _read(models, images) -> np.ndarray:
    return predict_proba(models.classifier, images).argmax(axis=1)


@pytest.mark.parametrize("count", [1, 5, 64])
def test_generate_gives_the_digit_asked_for(models, count):
    result = demo.generate(models, "7", count, 11)
    assert result["images"].shape == (count, 28, 28) and result["images"].dtype == np.uint8
    assert (result["labels"] == 7).all() and result["codes"].shape == (count, models.pca.n_features_in_)
    rows, cols = demo.grid_shape(count)
    assert result["picture"].shape == (rows * 28 * demo.SCALE + (rows - 1) * demo.GAP,
                                       cols * 28 * demo.SCALE + (cols - 1) * demo.GAP)
    assert (demo.cells_of(result["picture"], count) == result["images"]).all()  # the picture shows exactly them
    if count == 64:
        assert (_read(models, result["images"]) == 7).mean() >= 0.8


def test_generate_any_uses_the_plain_gan_and_seeds_repeat(models):
    first, again, other = (demo.generate(models, "any", 12, seed) for seed in (5, 5, 6))
    assert (first["labels"] == -1).all()
    assert (first["images"] == again["images"]).all() and not (first["images"] == other["images"]).all()
    assert len(set(_read(models, demo.generate(models, "any", 64, 0)["images"]))) >= 3  # not one digit only


def test_downloads_are_the_files_latentlab_sample_writes(models, demo_run, tmp_path, capsys):
    result = demo.generate(models, "4", 16, 3)
    png, npz = demo.save_downloads(models, result)
    assert png.parent == npz.parent == models.downloads and png.name == "digits-4-n16-seed3.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", "--run", str(demo_run.root), "--count", "16", "--digit", "4", "--seed", "3",
                 "--out", str(tmp_path / "cli.npz")]) == 0
    with np.load(npz) as ours, np.load(tmp_path / "cli.npz") as theirs:
        assert set(ours.files) == set(theirs.files)
        for key in theirs.files:
            assert (ours[key] == theirs[key]).all(), key


def test_download_folder_stays_bounded(models):
    for seed in range(6):
        demo.save_downloads(models, demo.generate(models, "1", 2, seed), keep=4)
    assert len(list(models.downloads.iterdir())) == 4


@pytest.mark.parametrize("digit, count, seed, field", [
    ("10", 4, 0, "digit"), (-1, 4, 0, "digit"), ("seven", 4, 0, "digit"), (None, 4, 0, "digit"),
    ("../../etc/passwd", 4, 0, "digit"), (3.5, 4, 0, "digit"),
    ("3", 0, 0, "how many"), ("3", 65, 0, "how many"), ("3", 2.5, 0, "how many"), ("3", True, 0, "how many"),
    ("3", float("nan"), 0, "how many"), ("3", "4; rm -rf /", 0, "how many"), ("3", [4], 0, "how many"),
    ("3", 4, -1, "seed"), ("3", 4, 2**31, "seed"), ("3", 4, "1e9", "seed"), ("3", 4, float("inf"), "seed"),
])
def test_generate_refuses_bad_values(models, digit, count, seed, field):
    files_before = set(models.downloads.iterdir())
    with pytest.raises(LatentlabError, match=field):
        demo.generate(models, digit, count, seed)
    assert set(models.downloads.iterdir()) == files_before


def test_values_from_the_page_are_accepted_in_their_forms(models):
    # Gradio sends numbers as floats or ints and dropdown choices as strings
    assert demo.generate(models, "2", 3.0, 7.0)["images"].shape == (3, 28, 28)
    assert demo.generate(models, 2, "3", "7")["labels"].tolist() == [2, 2, 2]


@pytest.mark.parametrize("steps, kind", [(2, "linear"), (20, "spherical")])
def test_interpolate_between_two_digits(models, steps, kind):
    row = demo.interpolate_row(models, "two digits", "1", "0", steps, kind, 2)
    assert row["images"].shape == (steps, 28, 28) and row["images"].dtype == np.uint8
    assert len(row["readings"]) == steps and row["codes"].shape[0] == steps
    for digit, confidence in row["readings"]:
        assert 0 <= digit <= 9 and 0.0 <= confidence <= 1.0
    # the readings are the classifier's on the shown images, and the ends are the digits asked for
    assert [d for d, _ in row["readings"]] == _read(models, row["images"]).tolist()
    assert row["readings"][0][0] == 1 and row["readings"][-1][0] == 0
    assert "a 1 and a 0" in row["about"] and kind in row["about"]


def test_the_flow_generates_and_walks_too(models, demo_run, tmp_path):
    result = demo.generate(models, "7", 64, 11, "flow")
    assert result["model"] == "flow" and (result["labels"] == 7).all()
    assert (_read(models, result["images"]) == 7).mean() >= 0.8
    assert not (result["images"] == demo.generate(models, "7", 64, 11)["images"]).all()  # not the GAN's digits
    # "any" samples the flow with no digit; the download is what `latentlab sample --model flow` writes
    anything = demo.generate(models, "any", 16, 3, "flow")
    _, npz = demo.save_downloads(models, anything)
    assert npz.name == "flow-digits-any-n16-seed3.npz"
    assert main(["sample", "--run", str(demo_run.root), "--count", "16", "--seed", "3", "--model", "flow",
                 "--out", str(tmp_path / "cli.npz")]) == 0
    with np.load(npz) as ours, np.load(tmp_path / "cli.npz") as theirs:
        assert (ours["images"] == theirs["images"]).all() and (ours["labels"] == theirs["labels"]).all()
    row = demo.interpolate_row(models, "two digits", "1", "0", 8, "linear", 2, "flow")
    assert row["readings"][0][0] == 1 and row["readings"][-1][0] == 0 and "latent flow" in row["about"]
    with pytest.raises(LatentlabError, match="model"):
        demo.generate(models, "7", 4, 0, "vae")
    with pytest.raises(LatentlabError, match="model"):
        demo.interpolate_row(models, "two digits", "1", "0", 8, "linear", 2, "diffusion")


def test_interpolate_between_two_test_images(models):
    row = demo.interpolate_row(models, "two test images", "3", "8", 6, "linear", 4)
    i, j = np.random.default_rng(4).choice(len(models.test_images), 2, replace=False)
    assert f"#{i}" in row["about"] and f"#{j}" in row["about"]
    assert row["images"].shape == (6, 28, 28)
    # the ends are the autoencoder's reconstructions of those two test images
    pair = torch.from_numpy(models.test_images[[i, j]]).float().div(255).unsqueeze(1)
    ends = decode(models.autoencoder.decoder, encode(models.autoencoder.encoder, pair))
    assert np.abs(row["images"][[0, -1]].astype(int) - (ends.squeeze(1).numpy() * 255).round()).max() <= 1
    html = demo.walk_html(row)
    assert html.count("<img ") == 6 and html.count('class="reading"') == 6


@pytest.mark.parametrize("args, field", [
    (("lines", "3", "8", 10, "linear", 0), "endpoints"), (("two digits", "any", "8", 10, "linear", 0), "first digit"),
    (("two digits", "3", "12", 10, "linear", 0), "second digit"), (("two digits", "3", "8", 1, "linear", 0), "steps"),
    (("two digits", "3", "8", 21, "linear", 0), "steps"), (("two digits", "3", "8", 10, "cubic", 0), "interpolation"),
    (("two test images", "3", "8", 10, "linear", -3), "seed"),
])
def test_interpolate_refuses_bad_values(models, args, field):
    with pytest.raises(LatentlabError, match=field):
        demo.interpolate_row(models, *args)


def test_latent_map_marks_the_current_samples(models):
    empty = demo.latent_map(models)
    marked = demo.latent_map(models, demo.generate(models, "0", 8, 0)["codes"])
    assert empty.ndim == 3 and empty.shape[2] == 3 and empty.dtype == np.uint8 and empty.shape == marked.shape
    assert (empty != marked).any(axis=2).mean() > 0.001
    assert models.test_points.shape == (len(models.test_images), 2)


def test_headline_numbers_come_from_metrics(models):
    rows = dict(demo.headline_numbers(models.metrics))
    assert rows["autoencoder test error (MSE per pixel)"] == f"{models.metrics['autoencoder']['test_mse']:.5f}"
    assert rows["the judging classifier's test accuracy"] == f"{models.metrics['classifier']['test_accuracy']:.2%}"
    assert all(value == "not measured" for value in dict(demo.headline_numbers({})).values())
    made_up = {"cgan": {"quality": {"accuracy": 0.9312, "frechet_distance": 3.14159}},
               "fewshot": {"labels": 50, "best_method": "knn", "methods": {"knn": {"test_accuracy": {"mean": 0.8}}}}}
    rows = dict(demo.headline_numbers(made_up))
    assert rows["conditional GAN: samples read as the digit asked for"] == "93.1%"
    assert rows["Frechet distance, conditional latent GAN"] == "3.14"
    assert rows["few-label test accuracy (50 labels, knn; mean over draws)"] == "80.0%"
    assert "No report yet" in demo.about_markdown(models, None)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_run_without_a_flow_still_serves_the_gans(gan_run, tmp_path):
    run_dir = shutil.copytree(gan_run.root, tmp_path / "run")
    (run_dir / "checkpoints" / "flow.pt").unlink()
    models = demo.load_models(run_dir)
    assert models.flow is None
    assert len(demo.generate(models, "3", 4, 0, model="GAN")["images"]) == 4
    with pytest.raises(LatentlabError, match="this run has no flow; train it with `latentlab train-flow"):
        demo.generate(models, "3", 4, 0, model="flow")


def test_demo_without_a_trained_run_names_the_command(tiny_run, tmp_path, capsys):
    assert main(["demo", "--run", str(tiny_run.root)]) == 2  # an autoencoder only
    line = _one_error_line(capsys)
    assert "gan" in line and f"latentlab run --out {tiny_run.root}" in line
    assert main(["demo", "--run", str(tmp_path / "nowhere")]) == 2
    assert "latentlab run --out" in _one_error_line(capsys)


@pytest.mark.parametrize("port", ["0", "70000"])
def test_demo_refuses_a_bad_port(demo_run, capsys, port):
    assert main(["demo", "--run", str(demo_run.root), "--port", port]) == 2
    assert "--port" in _one_error_line(capsys)


def test_demo_refuses_an_address_it_cannot_listen_on(demo_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--run", str(demo_run.root), "--port", str(port)]) == 2
        assert f"--port {port}: cannot listen there" in _one_error_line(capsys)
    assert main(["demo", "--run", str(demo_run.root), "--host", "10.255.255.1"]) == 2  # not this machine's
    assert "--host 10.255.255.1" in _one_error_line(capsys)
    for host in ("a..b", "a" * 70):  # names the resolver cannot encode (an empty label, a label over 63 characters)
        assert main(["demo", "--run", str(demo_run.root), "--host", host]) == 2
        assert f"--host {host}: not an address to listen on" in _one_error_line(capsys)


def test_demo_without_gradio_says_what_to_install(demo_run, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["demo", "--run", str(demo_run.root)]) == 2
    assert "latentlab[demo]" in _one_error_line(capsys)
