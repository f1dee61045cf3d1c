"""`latentlab sweep`: many seeds and settings at once, each trial an ordinary run folder, reported with its spread.

    DIR/seed0__gan.steps=500/   one trial: a run folder made by `latentlab run` (resumable, readable by
                                sample, demo and report); its output is in trial.log
    DIR/sweep.json              every trial's status and headline numbers, and per grid point their
                                mean, std, min, max and n over seeds
    DIR/sweep.md, sweep.html    a table and one figure per headline number (the html embeds the figures)
    DIR/figures/                those figures as PNG

A trial runs as a child process, `latentlab run --out DIR/<trial> --reuse DIR ...`: a trial that crashes or is
killed is one failed trial, not a dead sweep, and the pipeline's own resume redoes only its missing stages.
With --reuse DIR the trials share the stages they agree on (reuse.py): the judge across seeds, and across grid
points every stage upstream of the setting that changes. Trials run on this machine (a few at a time, each on
its share of the cores; on a CPU forked from one process that has imported everything) or, with --address, as
Ray tasks on a cluster. Either way the same function, `run_trial`, runs each one.

Exit status: 0 when every trial is done; 1 when any failed (named on stderr and in sweep.json); 2 for bad
input, before any trial starts.
"""
import importlib
import itertools
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from latentlab.errors import LatentlabError

TRIALS_PER_GPU = 4  # on a GPU, trials share it: each Ray task asks for 1/4 of one

# The headline numbers: name -> path into a trial's metrics.json (fewshot methods are added as they appear).
HEADLINES = {
    "autoencoder test MSE": ("autoencoder", "test_mse"),
    "classifier test accuracy": ("classifier", "test_accuracy"),
    "cGAN accuracy": ("cgan", "quality", "accuracy"),
    "GAN Frechet distance": ("gan", "quality", "frechet_distance"),
    "cGAN Frechet distance": ("cgan", "quality", "frechet_distance"),
    "GAN precision": ("gan", "quality", "precision"),
    "GAN recall": ("gan", "quality", "recall"),
    "cGAN precision": ("cgan", "quality", "precision"),
    "cGAN recall": ("cgan", "quality", "recall"),
    "flow accuracy": ("flow", "quality", "accuracy"),
    "flow Frechet distance": ("flow", "quality", "frechet_distance"),
    "flow recall": ("flow", "quality", "recall"),
    "flow (no digit) Frechet distance": ("flow", "quality_unconditional", "frechet_distance"),
    "flow (no digit) recall": ("flow", "quality_unconditional", "recall"),
}
FEWSHOT_FIRST = ("seed_mlp_frozen", "seed_mlp_end_to_end", "poisson_balanced")  # shown first, then the rest


@dataclass(frozen=True)
class Trial:
    name: str                   # its folder under DIR, e.g. "seed0__gan.steps=500"
    seed: int
    grid: tuple[str, ...]       # the grid point's settings, e.g. ("gan.steps=500",)
    settings: tuple[str, ...]   # every --set of the trial: the sweep's --set, then the grid point's
    config: object = field(default=None, compare=False)  # its resolved Config, as `plan` checked it

    @property
    def point(self) -> str:
        return ",".join(self.grid) or "base"


# ---------------------------------------------------------------- input

MAX_SWEEP_SEEDS = 10_000  # per grid point; each is a whole run


def parse_seeds(text: str) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "0,3,7" -> [0, 3, 7]; the two mix ("0-2,9")."""
    from latentlab.checks import MAX_SEED

    seeds = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise LatentlabError(f"--seeds {text}: '{item}' is not a seed (N) or a range (A-B) of whole numbers >= 0")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise LatentlabError(f"--seeds {text}: range {item} runs backwards")
        if last > MAX_SEED:  # checked before the list is made: a range can be long enough to fill the memory
            raise LatentlabError(f"--seeds {text}: seed {last} is above the largest, {MAX_SEED}")
        if len(seeds) + last - first + 1 > MAX_SWEEP_SEEDS:
            raise LatentlabError(f"--seeds {text}: more than {MAX_SWEEP_SEEDS:,} seeds")
        seeds += range(first, last + 1)
    if not seeds:
        raise LatentlabError(f"--seeds {text!r}: the seed list is empty")
    if len(set(seeds)) != len(seeds):
        raise LatentlabError(f"--seeds {text}: a seed is given twice")
    return seeds


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """["gan.steps=500,1000", "gan.lr=1e-3"] -> [("gan.steps", ["500", "1000"]), ("gan.lr", ["1e-3"])].

    Each key and value is checked as --set would check it (unknown setting, wrong type).
    """
    from latentlab.cli import apply_settings
    from latentlab.config import make_config

    grid = []
    for item in items:
        key, sep, text = item.partition("=")
        values = [v.strip() for v in text.split(",")]
        if not sep or not key or not all(values):
            raise LatentlabError(f"--grid {item}: expected SECTION.KEY=VALUE1,VALUE2,...")
        if key in [k for k, _ in grid]:
            raise LatentlabError(f"--grid {key}: given twice; list all its values in one --grid")
        if len(set(values)) != len(values):
            raise LatentlabError(f"--grid {item}: a value is given twice")
        for value in values:
            try:
                apply_settings(make_config(), [f"{key}={value}"])
            except LatentlabError as e:
                raise LatentlabError(str(e).replace("--set ", "--grid ", 1)) from None
        grid.append((key, values))
    return grid


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def trial_config(args, trial: "Trial"):
    """The trial's resolved settings, with the same checks `latentlab run` makes."""
    from latentlab.cli import resolve_config

    return resolve_config(Namespace(seed=trial.seed, device=args.device, data_dir=args.data_dir, quick=args.quick,
                                    set=list(trial.settings)))


def plan(args) -> list[Trial]:
    """Every trial of the sweep, each one's settings checked up front (bad input: nothing has run yet)."""
    seeds = parse_seeds(args.seeds)
    grid = parse_grid(args.grid)
    points = [tuple(f"{key}={value}" for (key, _), value in zip(grid, combo))
              for combo in itertools.product(*[values for _, values in grid])]
    trials = []
    for point in points:
        for seed in seeds:
            trial = Trial(name=_safe("__".join([f"seed{seed}", *point])), seed=seed, grid=point,
                          settings=(*args.set, *point))
            try:
                trial = replace(trial, config=trial_config(args, trial))
            except LatentlabError as e:  # e.g. a grid value that breaks a cross-setting check
                raise LatentlabError(f"--grid point {trial.point}: {e}" if point else str(e)) from None
            trials.append(trial)
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise LatentlabError("--grid: two grid points give the same folder name once made filesystem-safe; "
                             "write the values differently")
    if any(len(n) > 200 for n in names):
        raise LatentlabError("--grid: a trial's folder name would be longer than 200 characters; grid fewer keys")
    return trials


# ---------------------------------------------------------------- one trial

def trial_command(out: Path, trial: Trial, *, quick: bool, device, data_dir, reuse=()) -> list[str]:
    # --reuse: trials take the stages they agree on from each other (the judge across seeds; across grid points the
    # stages upstream of the setting that changes) instead of making them again, and from the places asked for
    command = [sys.executable, "-m", "latentlab", "run", "--out", str(out / trial.name), "--seed", str(trial.seed)]
    for place in (out, *reuse):
        command += ["--reuse", str(Path(place).resolve())]
    if quick:
        command.append("--quick")
    if device:
        command += ["--device", device]
    if data_dir:
        command += ["--data-dir", str(Path(data_dir).resolve())]
    for setting in trial.settings:
        command += ["--set", setting]
    return command


def _last_line(path: Path) -> str:
    """The last non-blank line of a log (progress bars write \\r, so split on it too)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    if "latentlab: " in last:  # the CLI's message can follow a progress bar on the same line
        last = last[last.rfind("latentlab: "):]
    return last[:300]


def thread_env(threads: int) -> dict[str, str]:
    """LATENTLAB_THREADS caps the threads every stage asks for; the OMP/MKL ones cap numpy's and scipy's BLAS.
    OpenMP's wait policy stays as `latentlab run` has it: a trial's workers spin only within its own cap."""
    return {"LATENTLAB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads)}


# ---- trials forked from a process that has imported torch and latentlab once (local trials on a CPU)

# What every trial imports: about 5 s of one core per process on 2 cores, paid once per sweep instead of per trial
PRELOAD = ["torch", "torch.optim", "torch._dynamo", "numpy", "scipy.sparse", "sklearn.mixture", "tqdm",
           "latentlab.figures", "latentlab.cli", "latentlab.pipeline", "latentlab.autoencoder",
           "latentlab.classifier", "latentlab.fewshot", "latentlab.gan", "latentlab.flow", "latentlab.evaluate",
           "latentlab.interpolation", "latentlab.report"]


def _forked_trial(argv: list[str], log: str, env: dict[str, str]) -> None:
    """A trial in a process forked from the preloaded server: `latentlab ARGV`, its output into `log`."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops it, even where the sweep ignores it
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, log, os.O_WRONLY | os.O_APPEND)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.dup2(1, 2)
    from latentlab.cli import main

    code = main(argv)
    if code == 130:  # interrupted: leave at once, as the command line does (no shutdown to hang in torch's threads)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)  # multiprocessing's exit: its finalizers release the semaphores tqdm made


class ForkedTrial:
    """A trial process forked from the preloaded server, with the two calls of subprocess.Popen used here."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]):
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        self.process = context.Process(target=_forked_trial, args=(argv, str(log), env))  # not daemonic: it may spawn
        self.process.start()

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def send_signal(self, signum) -> None:
        try:
            os.kill(self.process.pid, signum)
        except ProcessLookupError:  # it has just ended
            pass


def start_fork_server(threads: int) -> None:
    """Start the server that trials fork from; it imports PRELOAD while this process plans (the first fork waits
    for it). The trials' thread caps go in its environment: numpy's BLAS reads them when it is imported."""
    import multiprocessing
    from multiprocessing import forkserver

    os.environ.update(thread_env(threads))
    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def stop_fork_server() -> None:
    """End the server and wait for it, so that its trials' CPU time counts as this process's children's (with
    the method CPython's own tests use; where it is missing, the server ends when this process does)."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()


def run_trial(command: list[str], folder: str, threads: int, running: dict | None = None,
              forked: bool = False) -> dict:
    """Run one trial as a child process with `threads` threads; never raises for the trial's own failure.

    `running` (optional) holds the live child, so an interrupted sweep can stop it. `forked`: fork it from the
    preloaded server (start_fork_server) instead of starting `command`'s Python afresh.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **thread_env(threads)}
    log = folder / "trial.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        if forked:
            child = ForkedTrial(command[3:], log, thread_env(threads))  # command: python -m latentlab ARGV
        else:
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        if running is not None:
            running[folder.name] = child
        code = child.wait()
        if running is not None:
            running.pop(folder.name, None)
    seconds = round(time.perf_counter() - start, 2)
    if code == 0:
        return {"status": "done", "error": None, "seconds": seconds}
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    last = _last_line(log)
    return {"status": "failed", "error": f"{how}: {last}" if last else how, "seconds": seconds}


def is_done(folder: Path, config) -> bool:
    """Every stage recorded with the hashes of these settings and its files there (what `run` would skip)."""
    from latentlab.pipeline import STAGES, stage_done, stage_hashes
    from latentlab.runfolder import read_json

    path = folder / "stages.json"
    if not path.is_file():
        return False
    try:
        records = read_json(path)
    except LatentlabError:
        return False
    hashes = stage_hashes(config)
    return all(stage_done(folder, s, records.get(s.name), hashes[s.name]) for s in STAGES)


# ---------------------------------------------------------------- executors

def run_local(jobs: list[tuple[Trial, list[str]]], out: Path, workers: int, threads: int, on_result,
              forked: bool = False) -> None:
    """`workers` trials at a time on this machine. Threads here only wait: the work is in the child processes."""
    running: dict = {}
    try:
        _run_pool(jobs, out, workers, threads, on_result, forked, running)
    finally:
        if forked and jobs:
            stop_fork_server()


def _run_pool(jobs, out: Path, workers: int, threads: int, on_result, forked: bool, running: dict) -> None:
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(run_trial, command, str(out / trial.name), threads, running, forked): trial
               for trial, command in jobs}
    reported = set()
    try:
        for future in as_completed(futures):
            on_result(futures[future], future.result())
            reported.add(future)
    except KeyboardInterrupt:
        stop_trials(running)
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:  # record the interrupted trials too; the queued ones stay "not run"
            if future.done() and not future.cancelled() and future not in reported:
                on_result(futures[future], future.result())
        raise
    pool.shutdown()


def stop_trials(running: dict, grace: float = 10.0) -> None:
    """Ctrl-C for each trial in flight: it keeps its finished stages and says so in its log. One that has not
    ended after `grace` seconds (started with Ctrl-C ignored, as a sweep under nohup starts its trials) is
    terminated: its finished stages are kept all the same, only the stage in flight is lost."""
    for child in list(running.values()):
        child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:  # run_trial takes each child out when it has ended
        time.sleep(0.1)
    for child in list(running.values()):
        child.send_signal(signal.SIGTERM)


@contextmanager
def ray_cluster(address: str):
    """Connected to the Ray cluster at `address` ("auto": the one on this machine) for the `with` block."""
    try:
        import ray
    except ImportError:
        raise LatentlabError("--address needs Ray: pip install 'latentlab[cluster]'") from None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # Ray itself retries a silent address for minutes, logging as it goes
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except (OSError, OverflowError) as e:
            raise LatentlabError(f"--address {address}: nothing answers there ({getattr(e, 'strerror', None) or e}); "
                                 "start the cluster with `ray start --head` or give its address") from None
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as e:  # Ray raises ConnectionError, ValueError, RuntimeError... for a bad address
        raise LatentlabError(f"--address {address}: cannot connect to a Ray cluster "
                             f"({' '.join(str(e).split())[:150]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def run_ray(jobs: list[tuple[Trial, list[str]]], out: Path, device: str | None, on_result) -> None:
    """Each trial is a Ray task asking for one CPU (and a share of a GPU on a GPU cluster); Ray places them.

    Call it inside `ray_cluster`. The trial folders must be on a filesystem every node of the cluster sees.
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = device == "cuda" or (device in (None, "auto") and gpus > 0)
    task = ray.remote(num_cpus=1, num_gpus=1 / TRIALS_PER_GPU if use_gpu else 0, max_retries=0)(run_trial)
    pending = {task.remote(command, str(out / trial.name), 1): trial for trial, command in jobs}
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        trial = pending.pop(ready)
        try:
            result = ray.get(ready)
        except Exception as e:  # the task itself died (e.g. its node went away): one failed trial
            result = {"status": "failed", "error": f"ray task failed: {' '.join(str(e).split())[:200]}",
                      "seconds": None}
        on_result(trial, result)


# ---------------------------------------------------------------- aggregate

def _get(metrics: dict, path: tuple):
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics if isinstance(metrics, (int, float)) and not isinstance(metrics, bool) else None


def headline_values(metrics: dict) -> dict[str, float]:
    """The headline numbers of one trial's metrics.json, by name (missing ones left out)."""
    values = {name: _get(metrics, path) for name, path in HEADLINES.items()}
    fewshot = metrics.get("fewshot", {})
    methods = fewshot.get("methods", {})
    best = fewshot.get("best_method")
    if best in methods:
        values["50 labels: headline method"] = _get(methods, (best, "test_accuracy", "mean"))
    for name in [*[m for m in FEWSHOT_FIRST if m in methods], *sorted(set(methods) - set(FEWSHOT_FIRST))]:
        values[f"50 labels: {name}"] = _get(methods, (name, "test_accuracy", "mean"))
    timings = metrics.get("timings_s", {})
    for stage, seconds in timings.items():
        if stage != "this_invocation":
            values[f"seconds: {stage}"] = _get(timings, (stage,))
    return {k: v for k, v in values.items() if v is not None}


def taken_stages(folder: Path) -> list[str]:
    """The stages a trial took from another trial (--reuse) instead of making them."""
    from latentlab.checks import read_stages

    try:
        return [name for name, record in read_stages(folder / "stages.json").items() if record.get("reused_from")]
    except LatentlabError:  # not started, or not readable: none taken that we can tell
        return []


def spread(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0  # sample std (ddof 1)
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def aggregate(out: Path, trials: list[Trial], results: dict) -> dict:
    """sweep.json's content: each trial's status and numbers, and per grid point the spread over seeds."""
    from latentlab.runfolder import read_json

    rows = {}
    for trial in trials:
        result = results.get(trial.name, {"status": "not run", "error": None, "seconds": None})
        metrics_path = out / trial.name / "metrics.json"
        values = {}
        if result["status"] in ("done", "done before") and metrics_path.is_file():
            values = headline_values(read_json(metrics_path))
        rows[trial.name] = {"seed": trial.seed, "grid_point": trial.point, **result, "values": values,
                            "taken_from_other_trials": taken_stages(out / trial.name)}
    points = {}
    for point in dict.fromkeys(t.point for t in trials):
        members = [t for t in trials if t.point == point]
        names = list(dict.fromkeys(k for t in members for k in rows[t.name]["values"]))
        points[point] = {
            "settings": list(members[0].grid),
            "trials": [t.name for t in members],
            "metrics": {k: spread([rows[t.name]["values"][k] for t in members if k in rows[t.name]["values"]])
                        for k in names},
        }
    return {"trials": rows, "grid_points": points,
            "failed": [name for name, row in rows.items() if row["status"] not in ("done", "done before")],
            "note": "std is the sample standard deviation over seeds (n - 1), 0 when n = 1; a failed trial "
                    "counts in no grid point's numbers"}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _metric_names(summary: dict) -> list[str]:
    return list(dict.fromkeys(k for p in summary["grid_points"].values() for k in p["metrics"]))


def _figure_metrics(summary: dict) -> list[str]:
    """One figure per headline number; of the few-label methods, the headline one and the reference's three."""
    shown = {*HEADLINES, "50 labels: headline method", *[f"50 labels: {m}" for m in FEWSHOT_FIRST], "seconds: total"}
    return [m for m in _metric_names(summary) if m in shown]


def _figure_name(metric: str) -> str:
    return "sweep_" + re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_") + ".png"


def markdown(summary: dict) -> str:
    points = summary["grid_points"]
    lines = ["# latentlab sweep", "", f"`{summary['command']}`", "",
             f"{len(summary['trials'])} trials. Each cell: mean ± standard deviation over seeds, "
             "then (n seeds; min to max).", ""]
    lines += ["| metric | " + " | ".join(f"`{p}`" for p in points) + " |", "|---|" + "---|" * len(points)]
    for metric in _metric_names(summary):
        cells = []
        for p in points.values():
            s = p["metrics"].get(metric)
            cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({s['n']}; {_fmt(s['min'])} to {_fmt(s['max'])})"
                         if s else "-")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", "| trial | status | seconds | stages taken from other trials | error |", "|---|---|---|---|---|"]
    for name, row in summary["trials"].items():
        seconds = "-" if row["seconds"] is None else row["seconds"]
        taken = ", ".join(row.get("taken_from_other_trials", [])) or "-"
        lines.append(f"| `{name}` | {row['status']} | {seconds} | {taken} | {(row['error'] or '').replace('|', '/')} |")
    lines += ["", "## Per seed", "", "Each dot is one seed (labelled); the square and bar are the grid point's "
              "mean and standard deviation.", ""]
    lines += [f"![{m}](figures/{_figure_name(m)})\n" for m in _figure_metrics(summary)]
    return "\n".join(lines)


def write_figures(summary: dict, folder: Path) -> None:
    """One figure per headline number: a dot per seed, and each grid point's mean with its std as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    points = summary["grid_points"]
    for metric in _figure_metrics(summary):
        fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(points) + 2), 3.4))
        for x, info in enumerate(points.values()):
            values = [(summary["trials"][t]["seed"], summary["trials"][t]["values"].get(metric))
                      for t in info["trials"]]
            values = [(seed, v) for seed, v in values if v is not None]
            if not values:
                ax.text(x, 0.5, "no finished trial", ha="center", fontsize=7, transform=ax.get_xaxis_transform())
                continue
            xs = [x - 0.15 + 0.3 * i / max(1, len(values) - 1) for i in range(len(values))]  # spread the seeds
            ax.scatter(xs, [v for _, v in values], s=18, color="tab:blue", zorder=3)
            for xi, (seed, v) in zip(xs, values):
                ax.annotate(str(seed), (xi, v), fontsize=6, xytext=(3, 0), textcoords="offset points")
            s = info["metrics"][metric]
            ax.errorbar([x + 0.3], [s["mean"]], yerr=[s["std"]], fmt="s", color="tab:red", capsize=4, zorder=2)
        ax.set_xticks(range(len(points)), list(points), rotation=20 if len(points) > 3 else 0, fontsize=7)
        ax.set_xlim(-0.6, len(points) - 0.3)
        ax.set_title(f"{metric}\nper seed (blue dots, labelled), mean ± std over seeds (red)", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / _figure_name(metric), dpi=110)
        plt.close(fig)


def write_outputs(out: Path, trials: list[Trial], results: dict, header: dict, *, final: bool) -> dict:
    """sweep.json now (after every trial); the figures, sweep.md and sweep.html once at the end."""
    from latentlab.report import html_report
    from latentlab.runfolder import write_json, write_text

    summary = {**header, **aggregate(out, trials, results)}
    write_json(out / "sweep.json", summary)
    if final:
        write_figures(summary, out / "figures")
        text = markdown(summary)
        html = html_report(text, out).replace("<title>latentlab report</title>", "<title>latentlab sweep</title>")
        write_text(out / "sweep.md", text)
        write_text(out / "sweep.html", html)
    return summary


# ---------------------------------------------------------------- the command

def default_workers(trials: int) -> int:
    """As many trials at once as there are cores (each then runs on one thread), but no more than the trials."""
    return max(1, min(trials, os.cpu_count() or 1))


def threads_per_trial(workers: int) -> int:
    """Each of `workers` trials at once gets its share of the cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the sweep as Ctrl-C does: children stopped, numbers so far written


def sweep(args, command: str) -> int:
    """Run the sweep that the parsed `args` describe; returns the exit status: 0, or 1 if any trial failed."""
    from types import SimpleNamespace

    if args.workers is not None and args.workers < 1:
        raise LatentlabError(f"--workers {args.workers}: must be at least 1")
    if args.workers is not None and args.address:
        raise LatentlabError("--workers: for trials on this machine; with --address, Ray places the trials "
                             "(one CPU each)")
    from latentlab.reuse import check_places  # no torch: the fork server starts below before this process needs it

    trials = plan(args)
    check_places(args.reuse)
    out = Path(args.out).resolve()  # absolute: trial processes (Ray's too) may start in another folder
    # connected before any work: Ray missing, or no cluster at the address, is a one-line error
    with ray_cluster(args.address) if args.address else nullcontext():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LatentlabError(f"--out {out}: cannot create the folder ({e.strerror})") from None
        if not args.address:  # trials on this machine: the server they fork from imports while this one goes on
            start_fork_server(threads_per_trial(args.workers or default_workers(len(trials))))
        # what the summary's pages need (1.7 s of imports: scikit-learn through the report, matplotlib), now, on the
        # core the fork server's imports leave idle, rather than after the last trial, where the sweep's end waits on them
        for module in ("latentlab.figures", "latentlab.report"):
            importlib.import_module(module)
        from latentlab.pipeline import locked

        with locked(SimpleNamespace(root=out)):  # one sweep per folder at a time
            summary = _run(args, trials, out, command)
    print(f"latentlab: sweep finished: {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.html'}")
    if summary["failed"]:
        print(f"latentlab: {len(summary['failed'])} of {len(trials)} trials failed: " + "; ".join(
            f"{name} ({summary['trials'][name]['error']})" for name in summary["failed"]), file=sys.stderr)
        return 1
    return 0


def _run(args, trials: list[Trial], out: Path, command: str) -> dict:
    results, jobs = {}, []
    for trial in trials:
        if is_done(out / trial.name, trial.config):
            results[trial.name] = {"status": "done before", "error": None, "seconds": None}
        else:
            jobs.append((trial, trial_command(out, trial, quick=args.quick, device=args.device, reuse=args.reuse,
                                              data_dir=args.data_dir)))
    workers = args.workers or default_workers(len(jobs))
    threads = threads_per_trial(workers)
    if args.address:
        executor = {"kind": "ray", "address": args.address, "cpus_per_trial": 1}
        where = f"as Ray tasks on {args.address}"
    else:
        executor = {"kind": "local", "workers": workers, "threads_per_trial": threads}
        where = f"{workers} at a time, {threads} thread(s) each"
    header = {"command": command, "executor": executor}
    print(f"latentlab: sweep of {len(trials)} trials into {out}: {len(trials) - len(jobs)} done before, "
          f"{len(jobs)} to run {where}", flush=True)

    def on_result(trial: Trial, result: dict) -> None:
        results[trial.name] = result
        detail = f": {result['error']}" if result["error"] else ""
        print(f"latentlab: {trial.name} {result['status']} after {result['seconds']} s{detail}", flush=True)
        write_outputs(out, trials, results, header, final=False)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.address:
            run_ray(jobs, out, args.device, on_result)
        else:
            # on a CPU, trials fork from one process that has imported everything; CUDA's state must not be forked
            from latentlab.context import resolve_device

            on_cpu = resolve_device(args.device or "auto").type == "cpu"
            run_local(jobs, out, workers, threads, on_result, forked=on_cpu)
    finally:  # interrupted or not, the numbers so far are written
        signal.signal(signal.SIGTERM, previous)
        summary = write_outputs(out, trials, results, header, final=True)
    return summary
