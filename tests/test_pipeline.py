"""Resumable runs: stage records, invalidation on changed settings, the lock, a killed run."""
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

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


def _independent_stage(ctx):
    CALLS.append("independent")
    (ctx.run.root / "independent.txt").write_text("done")
    return {"independent": {"seed": ctx.config.seed}}


@pytest.fixture
def three_stages(monkeypatch):
    """The real autoencoder stage, a cheap stage that reads it and the fewshot settings, and one that reads nothing."""
    CALLS.clear()
    stages = [pipeline.STAGES[0], Stage("after", _counting_stage, ("fewshot",), ("after.txt",), ("autoencoder",)),
              Stage("independent", _independent_stage, ("classifier",), ("independent.txt",), ())]
    monkeypatch.setattr(pipeline, "STAGES", stages)


def test_second_run_skips_and_changed_setting_redoes_that_stage_and_its_readers(tmp_path, three_stages):
    run = Run(tmp_path / "r", create=True)
    config = tiny_config()
    Pipeline(run, config).run_all(workers=1)  # the test's stages live in this process only
    first = json.loads((run.root / "stages.json").read_text())
    assert set(first) == {"autoencoder", "after", "independent"} and CALLS == [2, "independent"]

    Pipeline(run, config).run_all(workers=1)
    assert json.loads((run.root / "stages.json").read_text()) == first  # nothing redone
    assert CALLS == [2, "independent"]

    config.fewshot.draws = 3  # only the second stage's settings change
    Pipeline(run, config).run_all(workers=1)
    again = json.loads((run.root / "stages.json").read_text())
    assert again["autoencoder"] == first["autoencoder"] and again["after"]["hash"] != first["after"]["hash"]
    assert again["independent"] == first["independent"]
    assert CALLS == [2, "independent", 3]

    config.autoencoder.epochs = 2  # the AE changes: it and the stage reading it are redone, not the other
    Pipeline(run, config).run_all(workers=1)
    assert CALLS == [2, "independent", 3, 3]
    last = json.loads((run.root / "stages.json").read_text())
    assert last["autoencoder"]["hash"] != first["autoencoder"]["hash"] and last["independent"] == first["independent"]
    metrics = run.metrics()
    assert metrics["autoencoder"]["epochs"] == 2 and metrics["after"] == {"draws": 3}
    assert {"autoencoder", "after", "independent", "total", "this_invocation"} <= set(metrics["timings_s"])


def test_dependents_follow_the_graph():
    assert pipeline.dependents("classifier") == {"baselines", "interpolation", "evaluation", "report"}
    assert pipeline.dependents("autoencoder") == set(pipeline.stage_names()) - {"autoencoder", "classifier"}
    assert pipeline.dependents("report") == set()
    for stage in pipeline.STAGES:  # every stage comes after what it reads, so hashes chain in one pass
        names = pipeline.stage_names()
        assert all(names.index(r) < names.index(stage.name) for r in stage.reads)


def test_a_fewshot_setting_changes_no_gan_hash():
    config = tiny_config()
    before = pipeline.stage_hashes(config)
    config.fewshot.neighbours += 1
    after = pipeline.stage_hashes(config)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"fewshot", "report"}


def test_the_judge_keeps_its_hash_whatever_the_run_seed():
    config = tiny_config()
    before = pipeline.stage_hashes(config)
    config.seed += 1
    after = pipeline.stage_hashes(config)
    assert after["classifier"] == before["classifier"]
    assert {name for name in before if before[name] != after[name]} == set(before) - {"classifier"}
    config.classifier.seed += 1
    assert pipeline.stage_hashes(config)["classifier"] != before["classifier"]


def test_stages_side_by_side_record_both(tmp_path, tiny_run, monkeypatch):
    """Two workers: the classifier runs in a child process beside the GAN; both are recorded with their outputs."""
    import shutil

    run = Run(shutil.copytree(tiny_run.root, tmp_path / "r", ignore=shutil.ignore_patterns(".lock")))
    config = tiny_config()
    pipe = Pipeline(run, config)
    monkeypatch.setattr(pipeline, "STAGES", [s for s in pipeline.STAGES if s.name in ("autoencoder", "classifier", "gan")])
    pipe.run_all(workers=2)
    records = json.loads((run.root / "stages.json").read_text())
    assert {"autoencoder", "classifier", "gan"} <= set(records)
    # when each ran and in which process, for the report's timeline: this command's two side by side
    made = {name: records[name] for name in ("classifier", "gan")}
    times = {name: (datetime.fromisoformat(r["started"]), datetime.fromisoformat(r["finished"])) for name, r in made.items()}
    assert made["classifier"]["invocation"] == made["gan"]["invocation"] != records["autoencoder"]["invocation"]
    assert all(start < end for start, end in times.values())
    assert times["classifier"][0] < times["gan"][1] and times["gan"][0] < times["classifier"][1]  # they overlapped
    assert sorted(r["beside"] for r in made.values()) == [False, True]
    assert (run.checkpoints / "classifier.pt").exists() and (run.checkpoints / "gan.pt").exists()
    metrics = run.metrics()
    assert metrics["classifier"]["train_images"] == config.classifier.train_limit
    assert metrics["gan"]["steps"] == config.gan.steps


def test_gpu_schedule_starts_the_long_stages_first_and_orders_every_stage():
    """On a GPU the few-label stage goes first here and the baselines after the classifier beside (no GPU needed:
    the schedule only reads the device's type)."""
    from types import SimpleNamespace

    import torch

    alone = {"try_reuse": lambda name: False, "claim": lambda name: None}  # a run with no --reuse
    assert set(pipeline.GPU_MAIN_ORDER) == set(pipeline.stage_names())
    assert set(pipeline.GPU_BESIDE_ORDER) <= set(pipeline.stage_names()) - set(pipeline.ALONE)
    gpu = pipeline.Schedule(SimpleNamespace(ctx=SimpleNamespace(device=torch.device("cuda")), **alone),
                            list(pipeline.stage_names()), done=set(), beside=True)
    assert gpu._take(gpu.main_order) == "autoencoder"
    gpu.done.add("autoencoder")
    assert gpu._take(gpu.main_order) == "fewshot" and gpu._take(gpu.beside_order, only=True) == "classifier"
    gpu.done.add("classifier")
    assert gpu._take(gpu.beside_order, only=True) == "baselines"
    cpu = pipeline.Schedule(SimpleNamespace(ctx=SimpleNamespace(device=torch.device("cpu")), **alone),
                            list(pipeline.stage_names()), done=set(), beside=True)
    assert (cpu.main_order, cpu.beside_order) == (pipeline.MAIN_ORDER, pipeline.BESIDE_ORDER)


def test_missing_output_makes_a_stage_undone(tmp_path, three_stages):
    run = Run(tmp_path / "r", create=True)
    Pipeline(run, tiny_config()).run_all(workers=1)
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
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # as a terminal would: a shell that started the tests in the background ignores SIGINT, and children
        # inherit that (Python then installs no Ctrl-C handler at all)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "split.npz").exists():
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr


def test_warming_up_leaves_a_damaged_data_file_to_the_stage_that_reads_it(tmp_path):
    """The GPU child's head start must not print a traceback: the error comes once, from the stage, in one line."""
    import torch

    from latentlab.context import Context

    (tmp_path / "data").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "data" / name).write_bytes(b"not gzip")
    config = tiny_config()
    config.data_dir = str(tmp_path / "data")
    ctx = Context(Run(tmp_path / "run", create=True), config, device=torch.device("cpu"))
    pipeline.warm_up(ctx)  # nothing raised, nothing kept
    with pytest.raises(LatentlabError):
        ctx.dataset


def test_the_stage_here_takes_the_idle_core_once_nothing_is_left_to_run_beside():
    """The evaluation can start beside the interpolation's last seconds, on one thread; when the stage beside ends
    and none is ready for the child, the context's thread budget becomes 2 (the evaluation reads it between its
    parts). While the child has work, this process keeps one thread."""
    import threading
    from types import SimpleNamespace

    import torch

    finished = ("ok", {}, 1.0, 10.0, 1.0, [])  # what the child sends for a finished stage

    class Done:
        def recv(self):
            return finished

    ctx = SimpleNamespace(device=torch.device("cpu"), threads=1)
    recorded = []
    fake_pipeline = SimpleNamespace(ctx=ctx, record=lambda name, *args, **kwargs: recorded.append(name),
                                    stage_files=lambda written: [], try_reuse=lambda name: False,
                                    claim=lambda name: None, unclaim=lambda name: None)  # a run with no --reuse
    schedule = pipeline.Schedule(fake_pipeline, todo=["evaluation"], done=set(), beside=True)
    schedule.main_threads = 1
    schedule._watch("interpolation", Done(), None)
    assert recorded == ["interpolation"] and ctx.threads == 2

    gate, sent = threading.Event(), []

    class Child:  # takes the next stage beside and finishes it when the gate opens
        def send(self, name):
            sent.append(name)

        def recv(self):
            gate.wait(10)
            return finished

    ctx.threads = 1
    schedule = pipeline.Schedule(fake_pipeline, todo=["gan"], done={"autoencoder"}, beside=True)
    schedule.main_threads, schedule.process, schedule.connection = 1, object(), Child()
    schedule._watch("cgan", Done(), None)
    assert sent == ["gan"] and ctx.threads == 1  # the child took the GAN: one thread each
    gate.set()
    schedule.watcher.join(10)
    assert recorded[-1] == "gan" and ctx.threads == 2


def test_the_child_is_let_go_once_nothing_is_left_that_may_run_beside():
    """When the stage beside ends and no stage left may run beside (only the evaluation, which runs here), the
    child is told to end then, so that its exit overlaps this side's last stage; the end of the run does not
    tell it twice. While a stage that may run beside is still waiting for its inputs, the child is kept."""
    from types import SimpleNamespace

    import torch

    finished = ("ok", {}, 1.0, 10.0, 1.0, [])

    class Done:
        def recv(self):
            return finished

    class Child:
        def __init__(self):
            self.sent, self.joined = [], 0

        def send(self, name):
            self.sent.append(name)

        def is_alive(self):
            return not self.joined  # it ends once told and waited for

        def join(self, timeout=None):
            self.joined += 1

    fake_pipeline = SimpleNamespace(ctx=SimpleNamespace(device=torch.device("cpu"), threads=1),
                                    record=lambda *args, **kwargs: None, stage_files=lambda written: [],
                                    try_reuse=lambda name: False, claim=lambda name: None, unclaim=lambda name: None)
    for todo, done, let_go in ((["evaluation"], set(), True), (["gan", "evaluation"], set(), False)):
        child = Child()
        schedule = pipeline.Schedule(fake_pipeline, todo=todo, done=done, beside=True)
        schedule.main_threads, schedule.process, schedule.connection = 1, child, child
        schedule._watch("interpolation", Done(), None)  # the GAN waits for the autoencoder: not ready, kept
        assert child.sent == ([None] if let_go else []) and schedule.released == let_go
        schedule.stop()
        assert child.sent == [None] and child.joined >= 1  # told once, and waited for


FREE_AND_TAKE_AGAIN = """
import resource, sys
if sys.argv[1] == "latentlab":
    import latentlab
def cycle():  # what a training step does: take blocks of a few MB, free them all
    blocks = [bytearray(16 << 20) for _ in range(3)]
    del blocks
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
before = faults()
for _ in range(5):
    cycle()
print((faults() - before) // 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_importing_latentlab_keeps_freed_memory_for_the_next_step():
    """Without it glibc hands the freed 48 MB back and the next step faults every page in again."""
    def faults_per_cycle(*args):
        out = subprocess.run([sys.executable, "-c", FREE_AND_TAKE_AGAIN, *args], capture_output=True, text=True,
                             check=True)
        return int(out.stdout)

    assert faults_per_cycle("plain") > 3000       # 48 MB of fresh pages
    assert faults_per_cycle("latentlab") < 100
