"""The CLI's contract: complete help, one-line errors with exit status 2, the run folder's files."""
import json
import subprocess
import sys

import pytest
import torch

from latentlab.cli import build_parser, main


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "train-ae"):
        assert command in out


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--device", "tpu"], "--device"),
    (["run", "--seed", "abc"], "--seed"),
    (["run", "--set", "nonsense.key=1"], "nonsense.key"),
    (["run", "--set", "autoencoder.epochs=two"], "autoencoder.epochs"),
    (["run", "--set", "autoencoder.epochs=0"], "autoencoder.epochs"),
    (["run", "--data-dir", "/no/such/folder"], "/no/such/folder"),
    (["run", "--set", "interpolation.steps=2"], "interpolation.steps"),
    (["run", "--set", "gan.r1=-1"], "gan.r1"),
    (["train-ae"], "--run"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert fragment in _error_line(capsys)


def test_unwritable_out_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--out", str(blocker / "run")]) == 2
    assert "cannot create" in _error_line(capsys)


@pytest.mark.parametrize("argv", [["sample", "--count", "2", "--out", "x.png", "--run"], ["evaluate", "--run"],
                                  ["report", "--run"], ["run", "--quick", "--out"], ["run", "--quick", "--data-dir"],
                                  ["sweep", "--quick", "--out", "sweep", "--reuse"]])
def test_a_name_the_system_refuses_is_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long_name = str(tmp_path / ("a" * 300))  # over the file system's 255 characters a name
    assert main(argv + [long_name]) == 2
    line = _error_line(capsys)
    assert line.startswith("latentlab: error: ") and ("File name too long" in line or "not a folder" in line), line
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_a_quick_run_has_its_own_default_folder():
    from latentlab.cli import default_out, resolve_config

    full = resolve_config(build_parser().parse_args(["run"]))
    quick = resolve_config(build_parser().parse_args(["run", "--quick", "--seed", "3"]))
    assert default_out(full) == "runs/mnist-seed0" and default_out(quick) == "runs/mnist-seed3-quick"


def test_a_file_given_as_run_folder_is_named_as_such(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert main(["evaluate", "--run", str(a_file)]) == 2
    assert _error_line(capsys) == f"latentlab: error: {a_file}: is a file, not a run folder"


def test_corrupt_checkpoint_is_one_line(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.root, run)
    (run / "checkpoints" / "autoencoder.pt").write_bytes(b"garbage")
    from latentlab.autoencoder import load_autoencoder
    from latentlab.errors import LatentlabError
    from latentlab.runfolder import Run

    with pytest.raises(LatentlabError, match="autoencoder.pt.*corrupt"):
        load_autoencoder(Run(run))
    (run / "checkpoints" / "autoencoder.pt").unlink()
    with pytest.raises(LatentlabError, match="autoencoder.pt.*missing.*train-ae"):
        load_autoencoder(Run(run))


def test_train_ae_writes_exactly_the_promised_files(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "latentlab", "train-ae", "--run", str(out), "--seed", "7", "--device", "cpu",
         "--set", "autoencoder.width=4", "--set", "autoencoder.latent_dim=8", "--set", "autoencoder.epochs=1",
         "--set", "autoencoder.train_limit=1000"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"config.json", "metrics.json", "stages.json", "split.npz", ".lock", "codes.pt",
                     "checkpoints/autoencoder.pt", "figures/ae_reconstructions.png", "figures/ae_losses.png"}
    codes = torch.load(out / "codes.pt", weights_only=True)  # every split's codes, for the later stages
    assert codes["train"].shape == (55_000, 8) and codes["val"].shape == (5_000, 8) and codes["test"].shape == (10_000, 8)
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 7 and config["autoencoder"]["latent_dim"] == 8
    assert {"torch", "latentlab", "git_commit"} <= set(config["environment"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["autoencoder"]["latent_dim"] == 8 and metrics["autoencoder"]["test_mse"] > 0
    assert metrics["timings_s"]["autoencoder"] > 0


def test_a_stage_command_on_a_done_stage_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-ae", "--run", str(out), "--device", "cpu", "--set", "autoencoder.width=4",
            "--set", "autoencoder.latent_dim=8", "--set", "autoencoder.epochs=1", "--set", "autoencoder.train_limit=1000"]
    assert main(args) == 0
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert main(args) == 0
    assert "done with these settings" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == written
    assert main(args + ["--force"]) == 0  # redone on request
    assert (out / "metrics.json").stat().st_mtime_ns != written[out / "metrics.json"]
