"""Bad input is refused before work starts, and no file of a run is trusted: issue 11, row by row.

The fuzz tests are in test_fuzz.py; these are the cases a user found, each pinned.
"""
import fcntl
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from latentlab import checks, cli
from latentlab.checks import MAX_SEED
from latentlab.config import make_config
from latentlab.errors import LatentlabError
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run

from .conftest import tiny_config


def run_cli(argv, capsys) -> tuple[int, str]:
    """cli.main in this process: (exit status, stderr); argparse's exits count as their status."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files_of(folder) -> dict:
    """Every file under `folder` with its bytes, to show a command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def must_refuse(monkeypatch):
    """A command that should be refused must not reach a stage (if it did, it would train for minutes)."""
    def fail(self, *args, **kwargs):
        raise AssertionError("accepted: the command reached a stage")

    monkeypatch.setattr(Pipeline, "run_all", fail)
    monkeypatch.setattr(Pipeline, "run_stage", fail)


@pytest.fixture
def finished(gan_run, tmp_path):
    """A copy of the tiny trained run (autoencoder, classifier, both GANs) with a report."""
    root = shutil.copytree(gan_run.root, tmp_path / "run")
    from latentlab.report import write_report

    write_report(root)
    return root


# ---- the tracebacks ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["run", "--seed", "-1"], "seed=-1"),
    (["run", "--seed", str(2**64)], f"seed={2**64}"),
    (["run", "--seed", str(2**63 - 1)], "must be a whole number 0-2147483647"),
    (["run", "--set", "autoencoder.lr=nan"], "autoencoder.lr=nan"),
    (["run", "--set", "gan.lr=inf"], "gan.lr=inf"),
    (["run", "--set", "autoencoder.train_limit=-5"], "autoencoder.train_limit=-5"),
    (["run", "--set", "evaluation.gmm_components=100000"], "evaluation.gmm_components=100000"),
    (["run", "--set", "fewshot.train_limit=500", "--set", "fewshot.neighbours=500"], "fewshot.train_limit=500"),
    (["run", "--set", "fewshot.train_limit=300", "--set", "fewshot.labels_per_class=40"], "rarest class"),
    (["run", "--set", "evaluation.samples=20000"], "10000 test images"),
    (["run", "--set", "autoencoder.train_limit=100", "--set", "autoencoder.batch_size=128"], "autoencoder.batch_size"),
    (["run", "--set", "autoencoder.epochs=2.5"], "expected a whole number"),
    (["run", "--set", "quick=true"], "--quick"),
    (["run", "--set", "fewshot.curve_images=5001"], "fewshot.curve_images"),
    (["run", "--set", "interpolation.pairs=1000"], "validation images"),
])
def test_bad_settings_are_refused_before_anything_is_written(argv, fragment, tmp_path, capsys, must_refuse):
    out = tmp_path / "run"
    code, err = run_cli([*argv, "--out", out], capsys)
    assert code == 2 and fragment in one_line(err)
    assert not out.exists()


def test_sample_seed_out_of_range(gan_run, tmp_path, capsys):
    out = tmp_path / "x.png"
    for seed in (-1, 2**64):
        code, err = run_cli(["sample", "--run", gan_run.root, "--count", 2, "--out", out, "--seed", seed], capsys)
        assert code == 2 and one_line(err) == f"latentlab: error: --seed {seed}: must be a whole number 0-{MAX_SEED}"
    assert not out.exists()


def test_largest_seed_runs_every_stage_to_the_end_at_every_limit(tmp_path):
    """The largest accepted seed, with every setting at the edge it is allowed: each stage runs to the end."""
    config = tiny_config(seed=MAX_SEED)
    config.autoencoder.latent_dim = 2
    config.autoencoder.train_limit = config.autoencoder.batch_size = 64            # batch = all its images
    config.classifier.train_limit = config.classifier.batch_size = 64
    config.classifier.epochs = 1
    fs = config.fewshot
    fs.train_limit, fs.neighbours, fs.labels_per_class, fs.draw = 10, 9, 1, "random"  # neighbours = images - 1
    fs.draws, fs.end_to_end_draws, fs.epochs, fs.curve_every, fs.curve_images, fs.balance = 1, 0, 1, 7, 1, 1.0
    for gan in (config.gan, config.cgan):
        gan.steps = gan.batch_size = gan.noise_dim = gan.hidden = gan.r1_every = gan.checkpoint_every = 1
        gan.log_every, gan.ema = 1, 0.0
    fl = config.flow
    fl.steps = fl.batch_size = fl.hidden = fl.layers = fl.ode_steps = fl.log_every = 1
    fl.embed_dim, fl.ema, fl.label_dropout, fl.solver = 2, 0.0, 0.0, "euler"
    config.interpolation.pairs, config.interpolation.steps = 2, 3
    ev = config.evaluation
    ev.samples, ev.k, ev.gmm_components, ev.gmm_fit_limit, ev.gmm_components_per_digit = 10, 9, 2, 2, 1
    ev.flow_sweep_samples = 10
    checks.check_config(config)  # accepted...
    run = Run(tmp_path / "run", create=True)
    Pipeline(run, config).run_all()  # ...and runs to the end
    assert set(Pipeline(run, config).records()) == {"autoencoder", "classifier", "fewshot", "gan", "cgan",
                                                      "flow", "baselines", "interpolation", "evaluation",
                                                      "report"}
    assert (run.root / "report.html").exists()


def test_derived_seeds_of_the_largest_seed_are_valid_everywhere():
    from latentlab.context import sub_seed

    for seed in (0, MAX_SEED):
        for purpose in ("gmm", "gan", "fewshot-draw-9", "classifier"):
            derived = sub_seed(seed, purpose)
            assert 0 <= derived < 2**32  # scikit-learn's random_state limit
            torch.Generator().manual_seed(derived)
            np.random.default_rng(derived)
        assert sub_seed(seed, "gan") != sub_seed(seed, "cgan")  # one seed per purpose


def test_every_setting_has_a_limit_and_help_prints_them(capsys):
    config = make_config()
    for section, spec in checks.FIELDS.items():
        names = set(spec) if isinstance(spec, dict) else None
        if names is not None:
            assert names == set(vars(getattr(config, section))), section
    assert {f for f in vars(config) if not isinstance(checks.FIELDS.get(f), dict)} == {
        "seed", "device", "data_dir", "quick", "stage_workers"}
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert "evaluation.gmm_components: a whole number 1-1000" in out and "rarest digit" in out
    assert "under a minute" not in out
    from latentlab import fewshot

    assert checks.VOTE_NEIGHBOURS == fewshot.VOTE_NEIGHBOURS


# ---- run files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, fragment", [
    ("stages.json", "[]", "stages.json: expected an object of stage records, found a list"),
    ("stages.json", '{"autoencoder": 3}', "stages.json: the record of stage 'autoencoder'"),
    ("metrics.json", "[]", "metrics.json: expected an object of sections, found a list"),
    ("metrics.json", '{"gan": "x"}', "metrics.json: section 'gan' must be an object"),
    ("config.json", "[]", "config.json: expected an object of settings"),
    ("config.json", '{"autoencoder": {"epochs": true}}', "config.json: autoencoder.epochs=True"),
    ("config.json", '{"autoencoder": {"epoch": 3}}', "config.json: unknown setting autoencoder.epoch"),
    ("config.json", '{"gan": {"lr": NaN}}', "config.json: gan.lr=nan"),
])
def test_damaged_json_is_one_line_and_nothing_runs(finished, name, content, fragment, capsys, must_refuse):
    (finished / name).write_text(content)
    before = files_of(finished)
    for command in ("train-gan", "report"):  # report only reads the run, and refuses what it cannot trust too
        code, err = run_cli([command, "--run", finished], capsys)
        assert code == 2 and fragment in one_line(err), command
        assert files_of(finished) == before


def test_report_section_damaged_inside(finished, capsys):
    metrics = json.loads((finished / "metrics.json").read_text())
    metrics["autoencoder"]["test_mse"] = "small"
    (finished / "metrics.json").write_text(json.dumps(metrics))
    code, err = run_cli(["report", "--run", finished], capsys)
    assert code == 2 and "metrics.json: the autoencoder section is damaged" in one_line(err)


def test_report_refuses_metrics_without_results_and_keeps_the_report(finished, capsys):
    run_cli(["report", "--run", finished], capsys)
    report = (finished / "report.html").read_bytes()
    for emptied in ({}, {"timings_s": {}}):
        (finished / "metrics.json").write_text(json.dumps(emptied))
        code, err = run_cli(["report", "--run", finished], capsys)
        assert code == 2 and "metrics.json: holds no results; run the stages first" in one_line(err)
        assert (finished / "report.html").read_bytes() == report


def test_checkpoint_of_the_wrong_kind_is_an_error(finished, tmp_path, capsys):
    shutil.copy(finished / "checkpoints" / "gan.pt", finished / "checkpoints" / "cgan.pt")
    code, err = run_cli(["sample", "--run", finished, "--count", 4, "--out", tmp_path / "x.png", "--digit", 3], capsys)
    assert code == 2 and "cgan.pt: holds a 'gan' model kind, not the 'cgan' asked for" in one_line(err)
    shutil.copy(finished / "checkpoints" / "classifier.pt", finished / "checkpoints" / "autoencoder.pt")
    code, err = run_cli(["sample", "--run", finished, "--count", 4, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "autoencoder.pt: holds a 'classifier' model kind" in one_line(err)
    assert not (tmp_path / "x.png").exists()


def test_gan_of_another_autoencoder_is_an_error(finished, tmp_path, capsys):
    from latentlab.autoencoder import checkpoint
    from latentlab.config import AutoencoderConfig
    from latentlab.models import Autoencoder

    from latentlab.models import CodeStats

    cfg = AutoencoderConfig(latent_dim=7, width=4)
    Run(finished).save_checkpoint("autoencoder", checkpoint(Autoencoder(latent_dim=7, width=4), cfg,
                                                            CodeStats(torch.zeros(7), torch.ones(7))))
    code, err = run_cli(["sample", "--run", finished, "--count", 4, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "gan.pt: makes codes of size 16, but the run's autoencoder decodes codes of size 7" in one_line(err)


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(code_std=torch.zeros_like(c["code_std"])), "code_std must be > 0"),
    (lambda c: c.update(code_mean=c["code_mean"][:3]), "code_mean must be a float tensor of the code's size"),
    (lambda c: c.pop("code_std"), "code_std must be a float tensor"),
    (lambda c: c["state_dict"][next(iter(c["state_dict"]))].fill_(float("nan")), "NaN or infinite"),
    (lambda c: c["model_args"].update(hidden=10**9), "model_args must map names to whole numbers"),
    (lambda c: c["model_args"].update(num_classes=10), "num_classes=10 does not fit a gan checkpoint"),
])
def test_checkpoint_contents_are_checked(finished, tmp_path, capsys, edit, fragment):
    path = finished / "checkpoints" / "gan.pt"
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    code, err = run_cli(["sample", "--run", finished, "--count", 4, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and fragment in one_line(err)


@pytest.mark.parametrize("arrays, fragment", [
    ({"train": np.arange(10)}, "damaged split file"),
    ({"train": np.arange(55_000), "val": np.arange(5_000)}, "share images"),
    ({"train": np.arange(55_000) * 2, "val": np.arange(55_000, 60_000)}, "within 0-59999"),
    ({"train": np.arange(55_000).astype(float), "val": np.arange(55_000, 60_000)}, "whole-number indices"),
])
def test_split_is_checked(finished, capsys, arrays, fragment, must_refuse):
    np.savez(finished / "split.npz", **arrays)
    before = files_of(finished)
    code, err = run_cli(["train-gan", "--run", finished], capsys)
    assert code == 2 and fragment in one_line(err)
    assert files_of(finished) == before


def test_label_file_is_checked(tmp_path, capsys, must_refuse):
    """A --data-dir with a rare class limits the per-class settings; one missing a class, or not labels, is refused."""
    import gzip

    from latentlab import data

    folder = tmp_path / "data"
    folder.mkdir()
    for stem in data.FILES.values():
        shutil.copy(data.shipped_dir() / f"{stem}.gz", folder / f"{stem}.gz")
    original = gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    sevens = np.flatnonzero(np.frombuffer(original, np.uint8, offset=8) == 7)

    def write(labels):
        (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))

    labels = bytearray(original)
    for i in sevens[100:]:  # 100 sevens left among 60,000 images: about 92 in the training split
        labels[8 + i] = 1
    write(labels)
    argv = ["run", "--data-dir", folder, "--out", tmp_path / "run"]
    code, err = run_cli([*argv, "--set", "evaluation.gmm_components_per_digit=500"], capsys)
    assert code == 2 and "gmm_components_per_digit=500: more than the" in one_line(err)
    code, err = run_cli([*argv, "--set", "fewshot.labels_per_class=200"], capsys)
    assert code == 2 and "fewshot.labels_per_class=200: the rarest class has only" in one_line(err)
    for i in sevens[:100]:
        labels[8 + i] = 1
    write(labels)
    code, err = run_cli(argv, capsys)
    assert code == 2 and "no image of class 7" in one_line(err)
    write(labels[:100])
    code, err = run_cli(argv, capsys)
    assert code == 2 and "train-labels-idx1-ubyte.gz" in one_line(err)
    assert not (tmp_path / "run").exists()


# ---- commands that only read a run -----------------------------------------------------------------------

def test_report_takes_no_option_that_would_change_the_run(finished, capsys):
    before = files_of(finished)
    for option in (["--seed", "5"], ["--set", "gan.steps=3"], ["--data-dir", "/tmp"]):
        code, err = run_cli(["report", "--run", finished, *option], capsys)
        assert code == 2 and f"unrecognized arguments: {option[0]}" in one_line(err)
    assert files_of(finished) == before
    code, _ = run_cli(["report", "--run", finished], capsys)
    assert code == 0
    after = files_of(finished)
    for name in ("config.json", "metrics.json", "stages.json"):
        assert after[name] == before[name]


def test_evaluate_refuses_before_rewriting_anything(finished, capsys, must_refuse):
    before = files_of(finished)
    code, err = run_cli(["evaluate", "--run", finished, "--set", "evaluation.samples=10001"], capsys)
    assert code == 2 and "evaluation.samples=10001: more than the 10000 test images" in one_line(err)
    assert files_of(finished) == before


@pytest.mark.parametrize("option, fragment", [
    (["--seed", "5"], "seed=5: this run was made with seed=0"),
    (["--set", "cgan.steps=3"], "cgan.steps=3: this run was made with cgan.steps=50"),
    (["--data-dir", "/tmp"], "data_dir="),
])
def test_stage_commands_change_only_their_own_settings(finished, option, fragment, capsys, must_refuse):
    before = files_of(finished)
    code, err = run_cli(["train-gan", "--run", finished, *option], capsys)
    assert code == 2 and fragment in one_line(err) and "changes only gan.* settings" in err
    assert files_of(finished) == before


def test_a_stage_rerun_with_the_same_settings_keeps_config_json(finished, capsys):
    before = (finished / "config.json").read_bytes()
    code, err = run_cli(["train-gan", "--run", finished, "--device", "cpu"], capsys)
    assert code == 0, err
    assert (finished / "config.json").read_bytes() == before  # versions and commit as the run recorded them


@pytest.mark.parametrize("command", ["fewshot", "train-gan", "train-cgan", "interpolate", "evaluate", "report",
                                     "demo"])
def test_commands_on_a_missing_folder_create_nothing(command, tmp_path, capsys, must_refuse):
    code, err = run_cli([command, "--run", tmp_path / "nowhere"], capsys)
    assert code == 2 and "no such run folder" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_stage_missing_its_input_writes_nothing(tiny_run, tmp_path, capsys, must_refuse):
    root = shutil.copytree(tiny_run.root, tmp_path / "run")
    before = files_of(root)
    code, err = run_cli(["interpolate", "--run", root, "--set", "interpolation.pairs=3"], capsys)
    assert code == 2 and "classifier.pt: checkpoint is missing; train it with `latentlab train-classifier" in one_line(err)
    assert files_of(root) == before


def test_a_folder_where_a_checkpoint_belongs_is_named_so(tiny_run, tmp_path, capsys):
    root = shutil.copytree(tiny_run.root, tmp_path / "run")
    (root / "checkpoints" / "classifier.pt").unlink(missing_ok=True)
    (root / "checkpoints" / "classifier.pt").mkdir()
    code, err = run_cli(["interpolate", "--run", root, "--set", "interpolation.pairs=3"], capsys)
    assert code == 2 and "classifier.pt: checkpoint is not a file; move it away and train it with" in one_line(err)
    (root / "checkpoints" / "gan.pt").mkdir()
    code, err = run_cli(["sample", "--run", root, "--count", 2, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "gan.pt: checkpoint is not a file" in one_line(err) and not (tmp_path / "x.png").exists()


def test_sample_while_a_run_is_writing_says_so(tiny_run, tmp_path, capsys):
    root = shutil.copytree(tiny_run.root, tmp_path / "run")
    with open(root / ".lock", "a+") as lock:  # as another process's `latentlab run` holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write("pid 999999")
        lock.flush()
        code, err = run_cli(["sample", "--run", root, "--count", 2, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "a latentlab command (pid 999999) is writing this run folder now" in one_line(err)
    code, err = run_cli(["sample", "--run", root, "--count", 2, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "gan.pt: checkpoint is missing" in one_line(err)


def test_out_under_a_regular_file(gan_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["sample", "--run", gan_run.root, "--count", 2, "--out", tmp_path / "file" / "sub" / "x.png"],
                        capsys)
    assert code == 2 and one_line(err).endswith(f"{tmp_path / 'file'} is a file, not a folder")


# ---- names and permissions -------------------------------------------------------------------------------

def test_report_names_the_dataset_and_quotes_mnist_figures_only_for_mnist(finished):
    from latentlab.report import write_report

    config = json.loads((finished / "config.json").read_text())
    metrics = json.loads((finished / "metrics.json").read_text())
    metrics["fewshot"] = {"labels": 50, "draws": 1, "draw": "balanced", "methods": {
        "seed_mlp_frozen": {"test_accuracy": {"mean": 0.7, "std": 0.0, "min": 0.7}, "transductive": False}}}
    (finished / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(finished)[0].read_text()
    assert text.startswith("# latentlab report: MNIST") and "74.5%" in text and "test digits" in text
    fashion = finished.parent / "fashion-mnist"
    fashion.mkdir()
    config["data_dir"] = str(fashion)
    (finished / "config.json").write_text(json.dumps(config))
    text = write_report(finished)[0].read_text()
    assert text.startswith("# latentlab report: fashion-mnist")
    assert "74.5%" not in text and "60.7%" not in text and "digit" not in text.split("## Settings")[0]


def test_every_file_a_run_writes_has_one_mode(tmp_path):
    old = os.umask(0o022)
    try:
        run = Run(tmp_path / "run", create=True)
        pipeline = Pipeline(run, tiny_config())
        pipeline.write_config()
        run.save_checkpoint("x", {"kind": "x"})
        (run.root / "plain.txt").write_text("a file written the ordinary way")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.root.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_missing_checkpoint_in_own_locked_run_is_not_blamed_on_a_writer(tiny_run, tmp_path):
    from latentlab.pipeline import locked

    run = Run(shutil.copytree(tiny_run.root, tmp_path / "run"))
    with locked(run), pytest.raises(LatentlabError, match="gan.pt: checkpoint is missing; train it with `latentlab "
                                                          "train-gan --run "):
        run.load_checkpoint("gan", made_by="train-gan")
