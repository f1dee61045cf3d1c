"""`latentlab sample`: the file formats, reproducible seeds, and one-line errors for bad input."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latentlab.cli import main
from latentlab.gan import load_decoder, load_gan, sample_images


def sample(run, *args) -> int:
    return main(["sample", "--run", str(run.root), *map(str, args)])


def test_npz_holds_uint8_images_and_labels(gan_run, tmp_path):
    plain, digit = tmp_path / "plain.npz", tmp_path / "three.npz"
    assert sample(gan_run, "--count", 7, "--out", plain) == 0
    assert sample(gan_run, "--count", 5, "--out", digit, "--digit", 3) == 0
    with np.load(plain) as f:
        assert sorted(f.files) == ["images", "labels"]
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (7, 28, 28)
    assert labels.dtype == np.int64 and labels.tolist() == [-1] * 7
    # the very images sample_images gives (255 = ink, like MNIST: tested in test_gan.py), seed 0 by default
    assert np.array_equal(images, sample_images(load_gan(gan_run, conditional=False), load_decoder(gan_run), 7))
    with np.load(digit) as f:
        assert f["images"].shape == (5, 28, 28) and f["labels"].tolist() == [3] * 5


def test_png_is_a_grid_of_the_samples(gan_run, tmp_path):
    out = tmp_path / "grid.png"
    assert sample(gan_run, "--count", 10, "--out", out, "--digit", 0) == 0
    with Image.open(out) as image:
        assert image.mode == "L"
        assert image.size == (4 * 30 + 2, 3 * 30 + 2)  # ceil(sqrt(10)) = 4 columns, 3 rows, 2-pixel gaps


def test_same_seed_same_digits_other_seed_other_digits(gan_run, tmp_path):
    files = {name: tmp_path / f"{name}.npz" for name in ("a", "b", "c")}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        assert sample(gan_run, "--count", 6, "--out", files[name], "--seed", seed, "--digit", 5) == 0
    a, b, c = (np.load(files[n])["images"] for n in ("a", "b", "c"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("args, message", [
    (["--count", 4, "--digit", 10], "--digit 10: must be a digit from 0 to 9"),
    (["--count", 4, "--digit", -1], "--digit -1: must be a digit from 0 to 9"),
    (["--count", 0], "--count 0: must be between 1 and 100000"),
    (["--count", 100001], "--count 100001: must be between 1 and 100000"),
])
def test_bad_numbers_are_one_line_errors(gan_run, tmp_path, capsys, args, message):
    out = tmp_path / "x.npz"
    assert sample(gan_run, *args, "--out", out) == 2
    err = capsys.readouterr().err
    assert err == f"latentlab: error: {message}\n"
    assert not out.exists()


def test_bad_paths_are_one_line_errors(gan_run, tiny_run, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    cases = [
        (gan_run, tmp_path / "missing" / "x.png", "does not exist"),       # no such output folder
        (gan_run, a_file / "x.png", "file.txt is a file, not a folder"),   # a file where a folder should be
        (gan_run, tmp_path, "is a folder"),
        (gan_run, tmp_path / "x.jpg", "must end in .png"),
        (gan_run, tmp_path / ("x" * 300 + ".png"), "cannot write"),       # the system refuses the name
        (tiny_run, tmp_path / "x.png", "gan.pt: checkpoint is missing; train it with `latentlab train-gan"),
    ]
    for run, out, message in cases:
        assert sample(run, "--count", 4, "--out", out) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentlab: error: ") and message in err and err.count("\n") == 1, err
    assert main(["sample", "--run", str(tmp_path / "nowhere"), "--count", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    # the conditional GAN is the model for --digit: a run with only the plain GAN names train-cgan
    assert sample(tiny_run, "--count", 4, "--out", tmp_path / "x.png", "--digit", 1) == 2
    assert "latentlab train-cgan" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".png", ".npz"])
def test_a_failed_write_leaves_the_existing_file_as_it_was(gan_run, tmp_path, capsys, monkeypatch, suffix):
    out = tmp_path / f"kept{suffix}"
    assert sample(gan_run, "--count", 6, "--out", out) == 0
    before = out.read_bytes()

    def disk_full(file, *args, **kwargs):  # half a file, then the error a full disk gives
        file.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("latentlab.pixels.write_grid_png", lambda images, f: disk_full(f))
    monkeypatch.setattr(np, "savez", disk_full)
    assert sample(gan_run, "--count", 9, "--seed", 1, "--out", out) == 2
    assert "cannot write there (No space left on device)" in capsys.readouterr().err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file


def test_the_installed_command_exits_2_without_a_traceback(gan_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "latentlab", "sample", "--run", str(gan_run.root),
                             "--count", "3", "--digit", "12", "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "latentlab: error: --digit 12: must be a digit from 0 to 9\n"


def test_checkpoints_of_the_wrong_kind_are_one_line_errors(gan_run, tmp_path, capsys):
    import shutil

    import torch

    run = shutil.copytree(gan_run.root, tmp_path / "run")
    good = torch.load(run / "checkpoints" / "gan.pt", weights_only=True)
    cases = [
        ("gan.pt", {k: v for k, v in good.items() if k != "code_mean"}, [], "gan.pt: code_mean must be a float tensor"),
        ("gan.pt", {k: v for k, v in good.items() if k != "model_args"}, [], "gan.pt: not a latentlab checkpoint"),
        ("gan.pt", {**good, "model_args": {**good["model_args"], "hidden": 7}}, [], "gan.pt: weights do not fit the model"),
        ("autoencoder.pt", {"kind": "autoencoder", "model_args": {}, "state_dict": {}}, [],
         "autoencoder.pt: weights do not fit the model"),
        # arguments of a model of about 17 GB beside small weights: more than a run's settings can make
        ("gan.pt", {**good, "model_args": {**good["model_args"], "hidden": 65_536}}, [],
         "gan.pt: model_args hidden=65536 is outside what gan.hidden allows (1-8192)"),
        # ... and of 270 MB, which a run can make: the weights' shapes are checked on the meta device, in no memory
        ("gan.pt", {**good, "model_args": {**good["model_args"], "hidden": 8192}}, [],
         "gan.pt: weights do not fit the model"),
        ("gan.pt", {**good, "state_dict": {k: torch.empty_like(v, device="meta") for k, v in good["state_dict"].items()}},
         [], "gan.pt: state_dict must map names to tensors"),
        ("gan.pt", {**good, "state_dict": {k: v.to_sparse() if v.dim() == 2 else v for k, v in good["state_dict"].items()}},
         [], "gan.pt: state_dict must map names to tensors"),
    ]
    for name, checkpoint, extra, message in cases:
        saved = (run / "checkpoints" / name).read_bytes()
        torch.save(checkpoint, run / "checkpoints" / name)
        assert main(["sample", "--run", str(run), "--count", "4", "--out", str(tmp_path / "x.png"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentlab: error: ") and message in err and err.count("\n") == 1, err
        (run / "checkpoints" / name).write_bytes(saved)


def test_loading_the_flow_checks_its_shapes_without_importing_the_compiler(gan_run):
    """The meta-device shape check builds the model with torch.nn.init left undone: there an embedding's init on
    the meta device imports torch._dynamo, 1.5-1.7 s of every cold `latentlab sample --model flow`. The check
    itself still refuses weights that do not fit."""
    code = ("import sys; from latentlab.runfolder import Run; from latentlab.flow import load_flow; "
            f"load_flow(Run({str(gan_run.root)!r})); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-500:]
