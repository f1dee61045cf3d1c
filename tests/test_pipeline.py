"""Resumable runs: stage records, invalidation on changed settings, the lock, a killed run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from latentlab import pipeline
from latentlab.errors import LatentlabError
from latentlab.pipeline import Pipeline, Stage, locked
from latentlab.runfolder import Run
from tests.conftest import tiny_config

CALLS = []


def _counting_stage(ctx):
    CALLS.append(ctx.config.fewshot.draws)
    (ctx.run.root / "after.txt").write_text("done")
    return {"after": {"draws": ctx.config.fewshot.draws}}


@pytest.fixture
def two_stages(monkeypatch):
    """The real autoencoder stage, then a cheap stage that reads the fewshot settings."""
    CALLS.clear()
    stages = [pipeline.STAGES[0], Stage("after", _counting_stage, ("fewshot",), ("after.txt",))]
    monkeypatch.setattr(pipeline, "STAGES", stages)


def test_second_run_skips_and_changed_setting_redoes_that_stage_and_later(tmp_path, two_stages):
    run = Run(tmp_path / "r", create=True)
    config = tiny_config()
    Pipeline(run, config).run_all()
    first = json.loads((run.root / "stages.json").read_text())
    assert set(first) == {"autoencoder", "after"} and CALLS == [2]

    start = time.perf_counter()
    Pipeline(run, config).run_all()
    assert time.perf_counter() - start < 5
    assert json.loads((run.root / "stages.json").read_text()) == first  # nothing redone
    assert CALLS == [2]

    config.fewshot.draws = 3  # only the second stage's settings change
    Pipeline(run, config).run_all()
    again = json.loads((run.root / "stages.json").read_text())
    assert again["autoencoder"] == first["autoencoder"] and again["after"]["hash"] != first["after"]["hash"]
    assert CALLS == [2, 3]

    config.autoencoder.epochs = 2  # an early setting changes: it and every later stage are redone
    Pipeline(run, config).run_all()
    assert CALLS == [2, 3, 3]
    assert json.loads((run.root / "stages.json").read_text())["autoencoder"]["hash"] != first["autoencoder"]["hash"]
    metrics = run.metrics()
    assert metrics["autoencoder"]["epochs"] == 2 and metrics["after"] == {"draws": 3}
    assert {"autoencoder", "after", "total"} <= set(metrics["timings_s"])


def test_missing_output_makes_a_stage_undone(tmp_path, two_stages):
    run = Run(tmp_path / "r", create=True)
    Pipeline(run, tiny_config()).run_all()
    (run.root / "after.txt").unlink()
    assert not Pipeline(run, tiny_config()).is_done("after")
    assert Pipeline(run, tiny_config()).is_done("autoencoder")


def test_lock_refuses_a_second_writer(tmp_path):
    run = Run(tmp_path / "r", create=True)
    with locked(run):
        with pytest.raises(LatentlabError, match="another latentlab command"):
            with locked(run):
                pass
    with locked(run):  # released after use
        pass


def test_lock_refuses_another_process(tmp_path):
    run = Run(tmp_path / "r", create=True)
    with locked(run):
        result = subprocess.run(
            [sys.executable, "-m", "latentlab", "train-ae", "--run", str(run.root)],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "another latentlab command" in result.stderr and "Traceback" not in result.stderr


def test_killed_run_resumes(tmp_path):
    """kill -9 in the middle of training: no broken checkpoint, no record; the next run completes it."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "latentlab", "train-ae", "--run", str(out), "--device", "cpu",
           "--set", "autoencoder.width=8", "--set", "autoencoder.epochs=50", "--set", "autoencoder.train_limit=4000"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "split.npz").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "stages.json").exists()
    assert not (out / "checkpoints" / "autoencoder.pt").exists()
    assert not list((out / "checkpoints").glob("*.tmp"))
    cmd[cmd.index("autoencoder.epochs=50")] = "autoencoder.epochs=1"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "stages.json").read_text())["autoencoder"]["hash"]


def test_ctrl_c_is_one_line(tmp_path):
    out = tmp_path / "r"
    process = subprocess.Popen(
        [sys.executable, "-m", "latentlab", "train-ae", "--run", str(out), "--set", "autoencoder.epochs=5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "split.npz").exists():
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr
