"""`latentlab sweep`: trials as run folders, resume after a kill, failures beside good trials, the aggregate, bad
input, and a real local Ray cluster. Trials are tiny runs on a copy of MNIST with a 1,000-image test set."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from latentlab import data
from latentlab.cli import main
from latentlab.pipeline import stage_names
from latentlab.sweep import aggregate, parse_seeds, plan, Trial

# Every trial of these tests: a few seconds per stage (the settings of conftest.tiny_config, smaller still).
TINY = [f"--set={s}" for s in (
    "autoencoder.train_limit=2000", "autoencoder.epochs=1", "autoencoder.width=8", "autoencoder.latent_dim=16",
    "classifier.train_limit=3000", "classifier.epochs=2", "classifier.width=8",
    "fewshot.draws=2", "fewshot.epochs=5", "fewshot.train_limit=2000", "fewshot.end_to_end_draws=1",
    "fewshot.curve_images=100", "gan.steps=50", "cgan.steps=50", "flow.steps=100", "flow.hidden=64",
    "evaluation.flow_sweep_samples=100", "interpolation.pairs=4",
    "evaluation.samples=200", "evaluation.gmm_components=5", "evaluation.gmm_components_per_digit=2",
    "evaluation.gmm_fit_limit=2000")]
GOOD, BAD = "seed0__gan.lr=0.001", "seed0__gan.lr=1"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The shipped training files and the first 1,000 test images: evaluation and test scores stay quick."""
    folder = tmp_path_factory.mktemp("tiny_mnist")
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(data.shipped_dir() / f"{stem}.gz", folder)
    test = data.load()
    images, labels = test.test_images[:1000], test.test_labels[:1000].astype(np.uint8)
    (folder / "t10k-images-idx3-ubyte").write_bytes(
        b"".join(int(v).to_bytes(4, "big") for v in (2051, *images.shape)) + images.tobytes())
    (folder / "t10k-labels-idx1-ubyte").write_bytes(
        b"".join(int(v).to_bytes(4, "big") for v in (2049, len(labels))) + labels.tobytes())
    return folder


def sweep_command(out, tiny_data, *options):
    return [sys.executable, "-m", "latentlab", "sweep", "--out", str(out), "--data-dir", str(tiny_data),
            "--device", "cpu", *TINY, *options]


def child_env():
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_WAIT_POLICY": "PASSIVE"}


def read(path):
    return json.loads(Path(path).read_text())


def test_killed_trial_resumes_and_a_failing_trial_does_not_stop_the_others(tmp_path, tiny_data):
    out = tmp_path / "S"
    # batch size 5000 > the 2000 training images: that trial fails at run time, inside its first stage
    command = sweep_command(out, tiny_data, "--seeds", "0", "--grid", "gan.lr=0.001,1",
                            "--workers", "2")
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    good = out / GOOD
    deadline = time.monotonic() + 300
    while not (good / "stages.json").exists():  # the good trial has finished its first stage
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
        time.sleep(0.05)
    trial_pid = int((good / ".lock").read_text().split()[1])  # `latentlab run` writes its pid in the lock
    os.kill(trial_pid, signal.SIGKILL)
    stdout, stderr = sweep.communicate(timeout=300)

    assert sweep.returncode == 1, stderr
    summary = read(out / "sweep.json")
    assert sorted(summary["failed"]) == sorted([GOOD, BAD])
    assert summary["executor"] == {"kind": "local", "workers": 2, "threads_per_trial": max(1, os.cpu_count() // 2)}
    assert summary["trials"][GOOD]["status"] == "failed"
    assert summary["trials"][GOOD]["error"].startswith("killed by SIGKILL")
    assert summary["trials"][BAD]["status"] == "failed"
    assert "gan: training diverged at step" in summary["trials"][BAD]["error"]
    assert "\n" not in summary["trials"][BAD]["error"]
    assert GOOD in stderr and BAD in stderr and "2 of 2 trials failed" in stderr
    first = read(good / "stages.json")
    assert first and set(first) < set(stage_names())  # killed after its first stage (made, or taken from BAD)

    # The same sweep again: the killed trial goes on from its second stage; the bad one fails again.
    again = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=300)
    assert again.returncode == 1, again.stderr
    stages = read(good / "stages.json")
    assert set(stages) == set(stage_names())
    assert all(stages[name] == record for name, record in first.items())  # kept, not redone
    # the two grid points differ in the GAN's settings only: every stage upstream of it was made once, by one
    bad = read(out / BAD / "stages.json")  # BAD has the AE at least: it fails in the GAN, which reads it
    for name in [n for n in ("autoencoder", "classifier", "fewshot") if n in bad or n == "autoencoder"]:
        assert stages[name]["hash"] == bad[name]["hash"]
        assert ("reused_from" in stages[name]) != ("reused_from" in bad[name]), name
    summary = read(out / "sweep.json")
    assert summary["trials"][GOOD]["status"] == "done" and summary["trials"][GOOD]["error"] is None
    assert summary["trials"][GOOD]["taken_from_other_trials"] == [n for n, r in stages.items() if "reused_from" in r]
    assert summary["failed"] == [BAD]

    # The aggregate is the trial's own metrics.json (one seed: n = 1, std 0).
    metrics = read(good / "metrics.json")
    point = summary["grid_points"]["gan.lr=0.001"]
    assert point["trials"] == [GOOD] and point["settings"] == ["gan.lr=0.001"]
    mse = metrics["autoencoder"]["test_mse"]
    assert point["metrics"]["autoencoder test MSE"] == {"mean": mse, "std": 0.0, "min": mse, "max": mse, "n": 1}
    assert point["metrics"]["cGAN Frechet distance"]["mean"] == metrics["cgan"]["quality"]["frechet_distance"]
    assert point["metrics"]["seconds: total"]["mean"] == metrics["timings_s"]["total"]
    assert summary["grid_points"]["gan.lr=1"]["metrics"] == {}

    # A trial folder is an ordinary run folder: `sample` reads it.
    assert main(["sample", "--run", str(good), "--count", "5", "--out", str(tmp_path / "five.npz")]) == 0

    # Once more, only the good point: it is done, so no process starts (its log is untouched).
    log_time = (good / "trial.log").stat().st_mtime_ns
    last = subprocess.run(command[:command.index("--grid")] + ["--grid", "gan.lr=0.001"],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert last.returncode == 0, last.stderr
    assert read(out / "sweep.json")["trials"][GOOD]["status"] == "done before"
    assert (good / "trial.log").stat().st_mtime_ns == log_time
    html = (out / "sweep.html").read_text()
    assert html.count('src="data:image/png;base64,i') >= 10 and 'src="figures/' not in html
    assert "| autoencoder test MSE |" in (out / "sweep.md").read_text()


def test_sigterm_stops_every_trial_which_keeps_its_finished_stages(tmp_path, tiny_data):
    """Started as a script's background job is, with Ctrl-C ignored, then stopped with SIGTERM: the trials stop
    too (none left running), each keeps its finished stages, sweep.json says so, and the same sweep resumes."""
    out = tmp_path / "S"
    command = sweep_command(out, tiny_data, "--seeds", "0-1", "--workers", "2")
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 300
    while not all((out / t / "stages.json").exists() for t in ("seed0", "seed1")):  # each has a finished stage
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
        time.sleep(0.05)
    pids = [int((out / t / ".lock").read_text().split()[1]) for t in ("seed0", "seed1")]
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "interrupted" in stderr
    for pid in pids:  # the trials have ended (their own processes, not only the sweep)
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
    summary = read(out / "sweep.json")
    kept = {}
    for trial in ("seed0", "seed1"):
        assert summary["trials"][trial]["status"] == "failed"
        assert "interrupted; finished stages are kept" in summary["trials"][trial]["error"]
        kept[trial] = read(out / trial / "stages.json")
        assert kept[trial] and set(kept[trial]) < set(stage_names())

    again = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=300)
    assert again.returncode == 0, again.stderr
    for trial, before in kept.items():
        after = read(out / trial / "stages.json")
        assert set(after) == set(stage_names()) and all(after[name] == before[name] for name in before)

    # Another sweep, another GAN setting, told to --reuse this one: its trial makes only what the GAN changes.
    other = tmp_path / "S2"
    second = subprocess.run(sweep_command(other, tiny_data, "--seeds", "0", "--grid", "gan.steps=60",
                                          "--reuse", str(out)),
                            capture_output=True, text=True, env=child_env(), timeout=300)
    assert second.returncode == 0, second.stderr
    records = read(other / "seed0__gan.steps=60" / "stages.json")
    made = {name for name, record in records.items() if "reused_from" not in record}
    assert made == {"gan", "interpolation", "evaluation", "report"}
    assert {records[n]["reused_from"] for n in set(records) - made - {"classifier"}} == {str(out / "seed0")}


def test_aggregate_is_mean_std_min_max_over_seeds(tmp_path):
    trials = [Trial(name=f"seed{s}__gan.steps=9", seed=s, grid=("gan.steps=9",), settings=("gan.steps=9",))
              for s in (0, 1, 2)]
    for trial, mse in zip(trials, (0.1, 0.2, 0.6)):
        (tmp_path / trial.name).mkdir()
        metrics = {"autoencoder": {"test_mse": mse}, "timings_s": {"gan": 2.0, "total": 10 * mse},
                   "fewshot": {"best_method": "poisson", "methods": {"poisson": {"test_accuracy": {"mean": mse}}}}}
        (tmp_path / trial.name / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / trials[1].name / "stages.json").write_text(json.dumps(
        {"autoencoder": {"hash": "a"}, "classifier": {"hash": "c", "reused_from": str(tmp_path / trials[0].name)}}))
    results = {t.name: {"status": "done", "error": None, "seconds": 1.0} for t in trials[:2]}
    results[trials[2].name] = {"status": "failed", "error": "boom", "seconds": 1.0}
    summary = aggregate(tmp_path, trials, results)
    assert [summary["trials"][t.name]["taken_from_other_trials"] for t in trials] == [[], ["classifier"], []]
    point = summary["grid_points"]["gan.steps=9"]["metrics"]
    assert point["autoencoder test MSE"]["n"] == 2  # the failed trial is not counted
    assert point["autoencoder test MSE"]["mean"] == pytest.approx(0.15)
    assert point["autoencoder test MSE"]["std"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    assert (point["autoencoder test MSE"]["min"], point["autoencoder test MSE"]["max"]) == (0.1, 0.2)
    assert point["50 labels: headline method"]["mean"] == pytest.approx(0.15)
    assert point["seconds: gan"] == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0, "n": 2}
    assert summary["failed"] == [trials[2].name]
    assert summary["trials"][trials[2].name]["values"] == {}


def test_seed_lists():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,3,7") == [0, 3, 7]
    assert parse_seeds("2-3,9") == [2, 3, 9]


@pytest.mark.parametrize("options, message", [
    (["--grid", "gan.nope=1,2"], "--grid gan.nope: unknown setting"),
    (["--grid", "nope=1"], "--grid nope: unknown setting"),
    (["--grid", "gan.steps=100,many"], "--grid gan.steps=many: expected a whole number"),
    (["--grid", "gan.steps=0,100"], "--grid point gan.steps=0: gan.steps=0: must be a whole number 1-10000000"),
    (["--grid", "gan.steps"], "--grid gan.steps: expected SECTION.KEY=VALUE1,VALUE2,..."),
    (["--grid", "gan.steps=1,,2"], "--grid gan.steps=1,,2: expected SECTION.KEY=VALUE1,VALUE2,..."),
    (["--grid", "gan.steps=1", "--grid", "gan.steps=2"], "--grid gan.steps: given twice"),
    (["--seeds", ""], "the seed list is empty"),
    (["--seeds", ","], "the seed list is empty"),
    (["--seeds", "4-1"], "--seeds 4-1: range 4-1 runs backwards"),
    (["--seeds", "a-b"], "--seeds a-b: 'a-b' is not a seed"),
    (["--seeds", "-1"], "is not a seed"),
    (["--seeds", "1,1"], "a seed is given twice"),
    (["--seeds", "0-99999999999"], "seed 99999999999 is above the largest, 2147483647"),  # before any list is made
    (["--seeds", "0-2147483647"], "more than 10,000 seeds"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--workers", "-2"], "--workers -2: must be at least 1"),
    (["--set", "gan.nope=1"], "--set gan.nope: unknown setting"),
    (["--workers", "2", "--address", "auto"], "--workers: for trials on this machine"),
    (["--reuse", "/no/such/folder"], "--reuse /no/such/folder: not a folder"),
])
def test_bad_sweep_input_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, options, message):
    out = tmp_path / "S"
    assert main(["sweep", "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentlab: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_an_address_where_nothing_answers_is_one_line_and_exit_2(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on: bound, never listened, closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    assert main(["sweep", "--out", str(tmp_path / "sweep"), "--seeds", "0", "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"latentlab: error: --address 127.0.0.1:{port}: nothing answers there") and err.count("\n") == 1
    assert time.perf_counter() - start < 30 and not (tmp_path / "sweep").exists()


def test_address_without_ray_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    out = tmp_path / "S"
    assert main(["sweep", "--out", str(out), "--seeds", "0", "--address", "auto"]) == 2
    err = capsys.readouterr().err
    assert err == "latentlab: error: --address needs Ray: pip install 'latentlab[cluster]'\n"
    assert not out.exists()


def test_trial_names_are_filesystem_safe():
    from argparse import Namespace

    args = Namespace(seeds="3", grid=["gan.loss=hinge,nonsaturating", "gan.lr=1e-3"], set=[], device=None,
                     data_dir=None, quick=True)
    assert [t.name for t in plan(args)] == ["seed3__gan.loss=hinge__gan.lr=1e-3",
                                            "seed3__gan.loss=nonsaturating__gan.lr=1e-3"]


def test_sweep_on_a_local_ray_cluster(tiny_data):
    ray = pytest.importorskip("ray")  # the `cluster` extra, which the README's test command installs
    out = Path(tempfile.mkdtemp(prefix="sweep"))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        # A real local cluster with 2 CPUs, started by this test; the sweep connects to it as a separate driver.
        info = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False,
                        log_to_driver=False)
        address = info.address_info["gcs_address"]
        result = subprocess.run(sweep_command(out, tiny_data, "--seeds", "0-1", "--address", address),
                                capture_output=True, text=True, env=child_env(), timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "as Ray tasks on" in result.stdout
        summary = read(out / "sweep.json")
        assert summary["failed"] == [] and summary["executor"]["kind"] == "ray"
        assert {name: row["status"] for name, row in summary["trials"].items()} == {"seed0": "done", "seed1": "done"}
        point = summary["grid_points"]["base"]["metrics"]
        for name, path in (("autoencoder test MSE", ("autoencoder", "test_mse")),
                           ("GAN Frechet distance", ("gan", "quality", "frechet_distance")),
                           ("cGAN accuracy", ("cgan", "quality", "accuracy"))):
            values = []
            for seed in (0, 1):
                value = read(out / f"seed{seed}" / "metrics.json")
                for key in path:
                    value = value[key]
                values.append(value)
            assert point[name]["n"] == 2
            assert point[name]["mean"] == pytest.approx(np.mean(values))
            assert point[name]["std"] == pytest.approx(np.std(values, ddof=1))
            assert (point[name]["min"], point[name]["max"]) == (min(values), max(values))
        assert read(out / "seed0" / "config.json")["seed"] == 0 and read(out / "seed1" / "config.json")["seed"] == 1
        # the judge has a seed of its own: one trial trained it, the other took it (at the same time on Ray)
        judges = [read(out / f"seed{seed}" / "stages.json")["classifier"] for seed in (0, 1)]
        assert sorted("reused_from" in j for j in judges) == [False, True] and judges[0]["hash"] == judges[1]["hash"]
        assert read(out / "seed0" / "metrics.json")["classifier"] == read(out / "seed1" / "metrics.json")["classifier"]
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
