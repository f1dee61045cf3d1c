"""The stages in order, what makes a stage done, and the lock that keeps two runs out of one folder.

A stage is done when DIR/stages.json records it with the hash of its settings chained to the hashes of
every stage before it, and its outputs exist. So a changed setting redoes that stage and all after it,
and a run killed mid-stage loses only that stage: the record is written after the stage's files.
"""
import fcntl
import hashlib
import importlib
import json
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from tqdm import tqdm

from latentlab.config import Config, to_dict
from latentlab.context import Context, resolve_device
from latentlab.errors import LatentlabError
from latentlab.runfolder import Run, environment, read_json, write_json


@dataclass(frozen=True)
class Stage:
    name: str
    function: str              # "module:function", imported only when the stage runs (or a callable)
    settings: tuple[str, ...]  # the Config sections it reads
    outputs: tuple[str, ...]   # files (relative to the run folder) that must exist for it to count as done


STAGES = [
    Stage("autoencoder", "latentlab.autoencoder:stage", ("autoencoder",), ("checkpoints/autoencoder.pt",)),
    Stage("classifier", "latentlab.classifier:stage", ("classifier",), ("checkpoints/classifier.pt",)),
    Stage("fewshot", "latentlab.fewshot:stage", ("fewshot",),
          ("fewshot_labels.json", "figures/fewshot_curves.png", "figures/fewshot_methods.png")),
    Stage("gan", "latentlab.gan:stage_gan", ("gan",), ("checkpoints/gan.pt", "figures/gan_samples.png")),
    Stage("cgan", "latentlab.gan:stage_cgan", ("cgan",), ("checkpoints/cgan.pt", "figures/cgan_samples.png")),
    Stage("flow", "latentlab.flow:stage", ("flow",), ("checkpoints/flow.pt", "figures/flow_samples.png")),
    Stage("interpolation", "latentlab.interpolation:stage", ("interpolation",), ("figures/interpolation.png",)),
    Stage("evaluation", "latentlab.evaluate:stage", ("evaluation",), ("figures/evaluation_frechet.png",)),
    Stage("report", "latentlab.report:stage", (), ("report.md", "report.html")),
]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def stage_hashes(config: Config) -> dict[str, str]:
    """Each stage's hash covers its own settings, the seed and data, and the hash of the stage before it."""
    values = to_dict(config)
    hashes, previous = {}, ""
    for stage in STAGES:
        own = {"seed": values["seed"], "data_dir": values["data_dir"], **{s: values[s] for s in stage.settings}}
        text = json.dumps({"stage": stage.name, "settings": own, "previous": previous}, sort_keys=True)
        previous = hashes[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return hashes


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


class Pipeline:
    """Runs stages in a run folder, records them in stages.json and keeps config.json current."""

    def __init__(self, run: Run, config: Config):
        self.run = run
        self.config = config
        self.ctx = Context(run=run, config=config, device=resolve_device(config.device))
        self.hashes = stage_hashes(config)

    def records(self) -> dict:
        path = self.run.root / "stages.json"
        return read_json(path) if path.exists() else {}

    def is_done(self, name: str) -> bool:
        stage = _stage(name)
        record = self.records().get(name)
        return bool(record and record.get("hash") == self.hashes[name]
                    and all((self.run.root / out).exists() for out in stage.outputs))

    def write_config(self) -> None:
        write_json(self.run.root / "config.json", {**to_dict(self.config), "environment": environment()})

    def run_stage(self, name: str) -> dict:
        """Run one stage now, record it, and forget every later stage (their inputs just changed)."""
        function = _stage(name).function
        if isinstance(function, str):
            module, attr = function.split(":")
            function = getattr(importlib.import_module(module), attr)
        start = time.perf_counter()
        sections = function(self.ctx)
        seconds = time.perf_counter() - start
        self.run.update_metrics(sections, {name: seconds})
        names = stage_names()
        records = {k: v for k, v in self.records().items() if k in names[:names.index(name)]}
        records[name] = {"hash": self.hashes[name], "seconds": round(seconds, 3),
                         "peak_rss_mb": peak_rss_mb(),  # of the whole process so far
                         "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(self.run.root / "stages.json", records)
        return sections

    def run_all(self, *, force: bool = False) -> None:
        self.write_config()
        total_start = time.perf_counter()
        for i, stage in enumerate(STAGES, 1):
            label = f"[{i}/{len(STAGES)}] {stage.name}"
            if not force and self.is_done(stage.name):
                tqdm.write(f"{label}: done before, skipped")
                continue
            tqdm.write(f"{label}: running")
            self.run_stage(stage.name)
            tqdm.write(f"{label}: finished in {self.records()[stage.name]['seconds']:.1f} s")
        timings = self.run.metrics().get("timings_s", {})
        # total: the wall time of every stage as last run, so a resumed run still reports the whole study
        self.run.update_metrics({"peak_memory_mb": {"this_invocation": peak_rss_mb()}},
                                {"total": sum(timings.get(n, 0.0) for n in stage_names()),
                                 "this_invocation": time.perf_counter() - total_start})
        if "report" in stage_names():  # once more, so the report shows the final timings
            from latentlab.report import write_report

            write_report(self.run.root)
