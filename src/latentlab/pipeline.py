"""The stages, what each reads, what makes a stage done, running independent stages side by side, and the lock
that keeps two runs out of one folder.

A stage is done when DIR/stages.json records it with the hash of its settings chained to the hashes of the
stages it reads, and its outputs exist. So a changed setting redoes that stage and the stages that read it
(a few-label setting no longer retrains the GANs), and a run killed mid-stage loses only the stages in
flight: a stage's record is written after its files.

`run_all` runs stages whose inputs are ready two at a time: one in this process, one in a child process
(spawned once per run, so it shares no threads or CUDA state with this one; it takes the stages beside in
turn). Both take one CPU thread each then, which is
where small networks are fastest anyway; the child's results come back as data and only this process writes
metrics.json and stages.json, under a lock.
"""
import fcntl
import hashlib
import importlib
import json
import multiprocessing
import os
import resource
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from latentlab import reuse
from latentlab.config import Config, from_dict, to_dict
from latentlab.context import Context, cpu_budget, resolve_device
from latentlab.errors import LatentlabError
from latentlab.runfolder import Run, environment, recording, write_json


@dataclass(frozen=True)
class Stage:
    name: str
    function: str              # "module:function", imported only when the stage runs (a callable in tests)
    settings: tuple[str, ...]  # the Config sections it reads
    outputs: tuple[str, ...]   # files (relative to the run folder) that must exist for it to count as done
    reads: tuple[str, ...]     # the stages whose outputs it uses


STAGES = [
    Stage("autoencoder", "latentlab.autoencoder:stage", ("autoencoder",), ("checkpoints/autoencoder.pt", "codes.pt"), ()),
    Stage("classifier", "latentlab.classifier:stage", ("classifier",), ("checkpoints/classifier.pt",), ()),
    Stage("fewshot", "latentlab.fewshot:stage", ("fewshot",),
          ("fewshot_labels.json", "figures/fewshot_curves.png", "figures/fewshot_methods.png"), ("autoencoder",)),
    Stage("gan", "latentlab.gan:stage_gan", ("gan",), ("checkpoints/gan.pt", "figures/gan_samples.png"),
          ("autoencoder",)),
    Stage("cgan", "latentlab.gan:stage_cgan", ("cgan",), ("checkpoints/cgan.pt", "figures/cgan_samples.png"),
          ("autoencoder",)),
    Stage("flow", "latentlab.flow:stage", ("flow",), ("checkpoints/flow.pt", "figures/flow_samples.png"),
          ("autoencoder",)),
    Stage("baselines", "latentlab.evaluate:stage_baselines", ("evaluation",),
          ("figures/baseline_gmm_samples.png", "figures/baseline_gmm_per_digit_samples.png"),
          ("autoencoder", "classifier")),
    Stage("interpolation", "latentlab.interpolation:stage", ("interpolation",), ("figures/interpolation.png",),
          ("autoencoder", "classifier", "gan", "flow")),
    Stage("evaluation", "latentlab.evaluate:stage", ("evaluation",), ("figures/evaluation_frechet.png",),
          ("autoencoder", "classifier", "gan", "cgan", "flow", "baselines")),
    Stage("report", "latentlab.report:stage", (), ("report.md", "report.html"),
          ("autoencoder", "classifier", "fewshot", "gan", "cgan", "flow", "baselines", "interpolation",
           "evaluation")),
]
# Two at a time: which ready stage this process takes first, and which may go to the child process beside it
# (the long ones that run as fast on one thread). The autoencoder runs alone on every core: all but the
# classifier wait for it. Then the two sides should finish together, as the evaluation waits for all: on 2 CPU
# cores the few-label stage (90 s), the flow (35 s) and the baselines (34 s) here, the classifier, cGAN, GAN
# and interpolation (152 s) beside; with --quick 21 s here and 19 s beside. (With the GAN here after a faster
# few-label stage, this side had waited 30 s for the baselines beside; the cGAN last had left one core idle
# for 53 s.)
MAIN_ORDER = ("autoencoder", "fewshot", "flow", "baselines", "classifier", "gan", "cgan", "interpolation",
              "evaluation", "report")
BESIDE_ORDER = ("classifier", "cgan", "gan", "interpolation", "flow", "baselines", "fewshot")
# On a GPU the stages' lengths differ (an H200 at 100bef9: few-label 12-13 s, baselines 10-12 s alone and 16-20 s
# beside it, autoencoder 7, classifier 6, GAN 5-6, cGAN 4.5, flow 2): the two long ones start first, the few-label
# stage here and the baselines beside after the classifier, and the generators follow.
GPU_MAIN_ORDER = ("autoencoder", "fewshot", "flow", "cgan", "gan", "interpolation", "evaluation", "baselines",
                  "classifier", "report")
GPU_BESIDE_ORDER = ("classifier", "baselines", "gan", "cgan", "interpolation", "flow")
ALONE = ("autoencoder",)
# Files of the run folder as a whole, never one stage's (a stage's record lists the files it wrote, for --reuse)
RUN_FILES = ("config.json", "metrics.json", "stages.json", "split.npz")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def stage_named(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def dependents(name: str) -> set[str]:
    """Every stage that reads `name`, directly or through another stage."""
    found, frontier = set(), {name}
    while frontier:
        frontier = {s.name for s in STAGES if set(s.reads) & frontier} - found
        found |= frontier
    return found


def stage_hashes(config: Config) -> dict[str, str]:
    """Each stage's hash covers its own settings, the seed and data, and the hashes of the stages it reads."""
    values = to_dict(config)
    hashes = {}
    for stage in STAGES:  # listed so that every stage comes after the stages it reads
        own = {"seed": values["seed"], "data_dir": values["data_dir"], **{s: values[s] for s in stage.settings}}
        if "seed" in own.get(stage.name, {}):  # a stage with a seed of its own (the judge): the run's does not count
            own["seed"] = own[stage.name]["seed"]
            own[stage.name] = {k: v for k, v in own[stage.name].items() if k != "seed"}
        text = json.dumps({"stage": stage.name, "settings": own, "reads": {r: hashes[r] for r in stage.reads}},
                          sort_keys=True)
        hashes[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return hashes


def stage_done(root: Path, stage: Stage, record: dict | None, stage_hash: str) -> bool:
    """Whether a run folder holds `stage` done: its record carries this hash and its outputs exist (what `run`
    skips; a sweep asks it of each trial's folder without a Pipeline)."""
    return bool(record and record.get("hash") == stage_hash
                and all((root / out).exists() for out in stage.outputs))


def stage_function(name: str):
    function = stage_named(name).function
    if callable(function):
        return function
    module, attr = function.split(":")
    return getattr(importlib.import_module(module), attr)


@contextmanager
def locked(run: Run):
    """Hold DIR/.lock for the whole command; the kernel drops it if the process dies, so no stale lock."""
    path = run.root / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise LatentlabError(f"{run.root}: another latentlab command ({owner}) is writing to this run folder; "
                             "wait for it or use another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def default_workers() -> int:
    """Two stages at once where there are two cores or more to use (each then runs one thread), else one."""
    return 2 if cpu_budget() >= 2 else 1


class Pipeline:
    """Runs stages in a run folder, records them in stages.json and keeps config.json current. With `reuse`
    (run folders, or folders of them), a stage finished there with the same hash is taken instead (reuse.py)."""

    def __init__(self, run: Run, config: Config, reuse: tuple = ()):
        self.run = run
        self.config = config
        self.ctx = Context(run=run, config=config, device=resolve_device(config.device))
        self.hashes = stage_hashes(config)
        self._lock = threading.Lock()  # metrics.json and stages.json have one writer at a time
        self.places = [Path(p) for p in reuse]
        self.claims: dict[str, list] = {}  # stage -> the claim locks held while it is made
        self.began = datetime.now(timezone.utc)  # this command's start: the report's timeline shows its stages

    def records(self) -> dict:
        from latentlab.checks import read_stages

        path = self.run.root / "stages.json"
        return read_stages(path) if path.exists() else {}

    def is_done(self, name: str) -> bool:
        return stage_done(self.run.root, stage_named(name), self.records().get(name), self.hashes[name])

    def write_config(self) -> None:
        write_json(self.run.root / "config.json", {**to_dict(self.config), "environment": environment()})

    def record(self, name: str, sections: dict, seconds: float, peak_mb: float, cpu_seconds: float,
               files: list[str], beside: bool = False, reused_from: str | None = None) -> None:
        """Merge a finished stage's sections into metrics.json, record it, and forget the stages that read it."""
        with self._lock:
            self.run.update_metrics(sections, {name: seconds})
            stale = dependents(name)
            records = {k: v for k, v in self.records().items() if k not in stale and k != name}
            now = datetime.now(timezone.utc)
            records[name] = {"hash": self.hashes[name], "seconds": round(seconds, 3), "peak_rss_mb": peak_mb,
                             "cpu_seconds": round(cpu_seconds, 2),  # user + system time of its process
                             "beside": beside,  # ran in a child process beside another stage
                             "started": (now - timedelta(seconds=seconds)).isoformat(timespec="milliseconds"),
                             "finished": now.isoformat(timespec="milliseconds"),
                             "invocation": self.began.isoformat(timespec="milliseconds"),  # the command's start
                             "files": files, "sections": sections}  # what --reuse takes
            if reused_from:
                records[name]["reused_from"] = reused_from
            write_json(self.run.root / "stages.json", records)

    def stage_files(self, written: list[Path]) -> list[str]:
        """The files a stage wrote, relative to the run folder (the run's own files left out)."""
        root, files = self.run.root.resolve(), set()
        for path in written:
            try:
                relative = Path(path).resolve().relative_to(root)
            except ValueError:  # written outside the run folder
                continue
            if str(relative) not in RUN_FILES:
                files.add(str(relative))
        return sorted(files)

    # ---- --reuse: stages finished by other runs, and claims on the ones this run makes

    def try_reuse(self, name: str) -> bool:
        """Take stage `name` from a run that finished it with the same hash, if there is one."""
        if not self.places or name in reuse.NEVER:
            return False
        stage = stage_named(name)
        for donor in reuse.donors(self.places, self.run.root):
            record = reuse.finished(donor, name, self.hashes[name], stage.outputs)
            if record is None:
                continue
            start = time.perf_counter()
            sections = reuse.adopt(self.run.root, donor, name, record)
            if sections is None:
                continue
            self.record(name, sections, time.perf_counter() - start, peak_rss_mb(), 0.0, record["files"],
                        reused_from=str(donor))
            if name == "autoencoder":
                self.ctx.autoencoder_changed()
            tqdm.write(f"{label(name)}: taken from {donor} (same settings)")
            return True
        return False

    def claim(self, name: str) -> Path | None:
        """Claim stage `name` for this run to make: None, or the lock of another run that is making it now."""
        held = reuse.claim(reuse.claim_folders(self.places), name, self.hashes[name]) if self.places else []
        if isinstance(held, Path):
            return held
        self.claims[name] = held
        return None

    def unclaim(self, name: str) -> None:
        reuse.release(self.claims.pop(name, []))

    def record_failure(self, error: LatentlabError) -> None:
        if error.sections:
            with self._lock:
                self.run.update_metrics(error.sections)

    def run_stage(self, name: str, threads: int = 2) -> dict:
        """Run one stage in this process now and record it."""
        self.ctx.threads = threads
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            with recording() as written:
                sections = stage_function(name)(self.ctx)
        except LatentlabError as e:
            self.record_failure(e)
            raise
        # peak memory: of this process so far
        self.record(name, sections, time.perf_counter() - start, peak_rss_mb(), time.process_time() - cpu_start,
                    self.stage_files(written))
        return sections

    def run_all(self, *, force: bool = False, workers: int | None = None) -> None:
        self.write_config()
        total_start = time.perf_counter()
        order = stage_names()
        todo = [n for n in order if force or not self.is_done(n)]
        for n in order:
            if n not in todo:
                tqdm.write(f"[{order.index(n) + 1}/{len(order)}] {n}: done before, skipped")
        # the report comes last, after the totals below, so that it shows them
        last = [n for n in todo if n == "report"]
        todo = [n for n in todo if n != "report"]
        two = (workers or default_workers()) > 1 and len(todo) > 1
        schedule = Schedule(self, todo, done=set(order) - set(todo) - set(last), beside=two)
        try:
            schedule.run()
        finally:
            schedule.stop()
        timings = self.run.metrics().get("timings_s", {})
        # total: the time of every stage as last run, added up, so a resumed run still reports the whole study;
        # this_invocation: what this command took, stages side by side counted once
        self.run.update_metrics({"peak_memory_mb": {"this_invocation": peak_rss_mb()}},
                                {"total": sum(timings.get(n, 0.0) for n in stage_names() if n != "report"),
                                 "this_invocation": time.perf_counter() - total_start})
        for name in last:
            self._run_and_say(name)

    def _run_and_say(self, name: str, threads: int = 2) -> None:
        tqdm.write(f"{label(name)}: running")
        self.run_stage(name, threads=threads)
        tqdm.write(f"{label(name)}: finished in {self.records()[name]['seconds']:.1f} s")


def label(name: str) -> str:
    return f"[{stage_names().index(name) + 1}/{len(STAGES)}] {name}"


# ---- a stage in a child process ------------------------------------------------------------------------

def warm_up(ctx: Context) -> None:
    """Ready before the first stage comes (a child started with the run on a GPU): the data read, CUDA's context
    made. Only a head start: a damaged data file is left for the first stage that reads it to name in one line."""
    try:
        ctx.dataset, torch.zeros(1, device=ctx.device)
    except Exception:
        pass


def _child(run_root: str, config_values: dict, device: str, connection) -> None:
    """The process beside: runs the stages it is sent, one at a time, until it is sent None. For each it sends
    back ("ok", sections, seconds, peak MB, CPU seconds) or the error. One process for every stage beside:
    starting one per stage cost about 2 s each (torch's import, the data) on 2 cores."""
    try:  # die with the parent: a killed run must not leave a stage writing into its folder
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.environ["TQDM_POSITION"] = "1"  # its progress bar under the parent's
    try:
        ctx = Context(run=Run(run_root), config=from_dict(config_values), device=resolve_device(device), threads=1)
        if ctx.device.type == "cuda":
            warm_up(ctx)
        while (name := connection.recv()) is not None:
            try:
                start, cpu_start = time.perf_counter(), time.process_time()
                with recording() as written:
                    sections = stage_function(name)(ctx)
                connection.send(("ok", sections, time.perf_counter() - start, peak_rss_mb(),
                                 time.process_time() - cpu_start, written))
            except LatentlabError as e:
                connection.send(("error", str(e), e.sections))
            except Exception:  # a bug: bring its traceback back to the parent
                connection.send(("crash", traceback.format_exc(), None))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):  # Ctrl-C, or the parent went away
        pass
    finally:
        connection.close()


class Schedule:
    """Stages two at a time: one in this process, one in a spawned child beside it, each taking the next ready
    stage by its order when it is free. Both run one thread then; a stage alone in this process runs two."""

    def __init__(self, pipeline: Pipeline, todo: list[str], done: set[str], beside: bool):
        self.pipeline, self.todo, self.done, self.beside = pipeline, list(todo), set(done), beside
        self.on_gpu = pipeline.ctx.device.type == "cuda"
        self.main_order, self.beside_order = ((GPU_MAIN_ORDER, GPU_BESIDE_ORDER) if self.on_gpu
                                              else (MAIN_ORDER, BESIDE_ORDER))
        self.condition = threading.Condition()  # guards everything below; the watcher thread notifies it
        self.main_threads = 0                   # threads of the stage running here (0: none)
        self.process = self.connection = self.watcher = None  # the child process beside, its pipe, its waiter
        self.released = False                   # the child was told to end: no stage left for it
        self.failure: BaseException | None = None
        self.wait_on: Path | None = None        # a stage's claim held by another run (--reuse)

    def _take(self, order: tuple[str, ...], only: bool = False) -> str | None:
        """The first ready stage by `order` (then any other, unless `only`), taken off the list and claimed.

        With --reuse, ready stages that another run has finished are taken from it on the way, and a stage another
        run is making now is left to it: `self.wait_on` is then its claim, to wait for if nothing else is ready."""
        while True:
            ready = [n for n in self.todo if set(stage_named(n).reads) <= self.done]
            reused = [n for n in ready if self.pipeline.try_reuse(n)]
            for name in reused:
                self.todo.remove(name)
                self.done.add(name)
            if reused:
                continue  # the stages that read them may be ready now
            for name in sorted((n for n in ready if n in order or not only),
                               key=lambda n: order.index(n) if n in order else len(order)):
                busy = self.pipeline.claim(name)
                if busy is not None:
                    self.wait_on = busy
                elif self.pipeline.try_reuse(name):  # finished elsewhere just before the claim
                    self.pipeline.unclaim(name)
                    self.todo.remove(name)
                    self.done.add(name)
                    break
                else:
                    self.todo.remove(name)
                    return name
            else:
                return None

    @property
    def side_busy(self) -> bool:
        return self.watcher is not None and self.watcher.is_alive()

    def run(self) -> None:
        if self.beside and self.on_gpu and len(self.todo) > 1:
            # beside a GPU the cores are idle: the child's start (imports, CUDA, the data) overlaps the autoencoder;
            # on 2 CPU cores it would take one of the autoencoder's two threads
            self._spawn()
        while True:
            with self.condition:
                if self.failure is not None:
                    raise self.failure
                self.wait_on = None
                name = self._take(self.main_order if self.beside else tuple(stage_names()))
                if name is None:
                    if not self.todo and not self.side_busy:
                        return
                    wait_on = self.wait_on
                    if wait_on is None:
                        if not self.side_busy:
                            raise RuntimeError(f"stages {self.todo} wait on stages that are not running")
                        self.condition.wait()  # for the stage beside to finish
                        continue
                else:
                    if self.beside and name not in ALONE and not self.side_busy:
                        self._start_beside()
                    self.main_threads = 1 if self.side_busy else 2
            if name is None:  # only stages that another run is making are ready: wait for one, then take it
                tqdm.write(f"latentlab: waiting for another run to finish a stage ({wait_on.name})")
                reuse.wait_for(wait_on)
                continue
            try:
                self.pipeline._run_and_say(name, threads=self.main_threads)
            finally:
                self.pipeline.unclaim(name)
            with self.condition:
                self.main_threads = 0
                self.done.add(name)

    def _start_beside(self) -> None:
        """Send the next stage allowed beside to the child process, if one is ready (under the lock)."""
        name = self._take(self.beside_order, only=True)
        if name is None:
            if self.process is not None and not self.released and not set(self.todo) & set(self.beside_order):
                # nothing left that may run beside: let the child end now, beside this side's last stages, instead
                # of at the end of the run (its exit took 0.5-0.7 s there)
                self.released = True
                try:
                    self.connection.send(None)
                except OSError:  # it is gone already: stop() finds it so
                    pass
            return
        if self.process is None:  # started once, on first need: a run with nothing to do beside spawns nothing
            self._spawn()
        self.connection.send(name)
        tqdm.write(f"{label(name)}: running beside")
        self.watcher = threading.Thread(target=self._watch, args=(name, self.connection, self.process), daemon=True)
        self.watcher.start()

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        p = self.pipeline
        self.process = context.Process(target=_child, args=(str(p.run.root), to_dict(p.config), str(p.ctx.device),
                                                            child_end), daemon=True)
        self.process.start()
        child_end.close()

    def _watch(self, name: str, receive, process) -> None:
        """Wait for the child, record what it sends, and start the next stage beside while this process is busy."""
        try:
            try:
                result = receive.recv()
            except EOFError:  # the child died without a word (killed, out of memory)
                process.join()
                result = ("crash", f"the process running this stage died (exit code {process.exitcode})", None)
            try:
                if result[0] == "ok":
                    _, sections, seconds, peak_mb, cpu_seconds, written = result
                    self.pipeline.record(name, sections, seconds, peak_mb, cpu_seconds,
                                         self.pipeline.stage_files(written), beside=True)
                    tqdm.write(f"{label(name)}: finished in {seconds:.1f} s (beside)")
                elif result[0] == "error":
                    error = LatentlabError(result[1])
                    error.sections = result[2]
                    self.pipeline.record_failure(error)
                    raise error
                else:
                    raise RuntimeError(f"stage {name} failed in its child process:\n{result[1]}")
            finally:  # after the record: a run waiting on the claim then finds the stage done
                self.pipeline.unclaim(name)
            with self.condition:
                self.done.add(name)
                self.watcher = None  # this thread is about to end: not busy any more
                if self.main_threads == 1 and self.failure is None:
                    self._start_beside()
                    if self.watcher is None:  # nothing left to run beside: the stage here may take the idle core
                        self.pipeline.ctx.threads = 2  # (stages that read it again between parts: evaluation)
                self.condition.notify_all()
        except BaseException as e:  # whatever happens here, the main loop must hear of it
            with self.condition:
                self.failure = e
                self.watcher = None
                self.condition.notify_all()

    def stop(self) -> None:
        """On the way out: let an idle child process end; end one still running a stage (after an error or
        Ctrl-C here), whose work is lost. An idle child is asked, not terminated: killed, it left tqdm's lock
        registered and Python warned of a "leaked semaphore" at exit (its own exit costs 0.7 s)."""
        process = self.process
        if process is not None and process.is_alive():
            if not self.side_busy:
                try:
                    if not self.released:
                        self.connection.send(None)
                    process.join(5)
                except OSError:
                    pass
            if process.is_alive():
                process.terminate()
                process.join(5)
        watcher = self.watcher
        if watcher is not None:  # a stage beside that had just finished: let its record be written
            watcher.join(5)
