"""Sweep benchmark: `latentlab sweep --quick --seeds 0-3` with 2 workers against the same four trials run one
after another (`latentlab run --quick --seed S`, each with every core), in fresh folders. Prints both wall
times and their ratio (target: at most 0.65 on a 2-core machine).

    python bench/bench_sweep.py                 # seeds 0-3, 2 workers (about 4-5 minutes on 2 cores)
    python bench/bench_sweep.py --seeds 0-1     # a shorter look
    python bench/bench_sweep.py --keep DIR      # keep the runs and the sweep (DIR/S) instead of deleting them
    python bench/bench_sweep.py --seeds 0-1 --grid gan.steps=1000,1500   # a grid: trials share more stages

Run it on a quiet machine: other processes on the cores change both times.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from latentlab.cli import build_parser
from latentlab.sweep import plan


def cpu_seconds() -> float:
    """CPU time (user + system) of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-3")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", metavar="DIR", help="write the runs and the sweep here and keep them")
    parser.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                        help="passed to the sweep; the runs one after another get each trial's values with --set")
    args = parser.parse_args()
    grid = [f"--grid={g}" for g in args.grid]
    trials = plan(build_parser().parse_args(["sweep", "--out", "unused", "--quick", "--seeds", args.seeds, *grid]))
    latentlab = [sys.executable, "-m", "latentlab"]
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.keep or temporary)
        if args.keep and folder.exists() and any(folder.iterdir()):
            sys.exit(f"--keep {folder}: not empty (the benchmark needs fresh folders)")
        # CPU seconds beside wall seconds: on a shared machine other processes take cores from both halves
        print(f"before: {load()}", flush=True)
        cpu = cpu_seconds()
        one_by_one = sum(timed(latentlab + ["run", "--quick", "--seed", str(t.seed), "--out", str(folder / t.name),
                                            *[f"--set={s}" for s in t.settings]])
                         for t in trials)
        cpu, cpu_one_by_one = cpu_seconds(), cpu_seconds() - cpu
        print(f"{len(trials)} quick runs one after another: {one_by_one:.1f} s wall, {cpu_one_by_one:.1f} s CPU "
              f"(then {load()})", flush=True)
        sweep = timed(latentlab + ["sweep", "--quick", "--seeds", args.seeds, *grid, "--workers", str(args.workers),
                                   "--out", str(folder / "S")])
        print(f"latentlab sweep --quick --seeds {args.seeds} {' '.join(grid)} --workers {args.workers}: "
              f"{sweep:.1f} s wall, {cpu_seconds() - cpu:.1f} s CPU (then {load()})")
        stages, taken = {}, 0
        for t in trials:  # each stage's mean seconds, alone and inside the sweep: where the time went
            for name, out in (("alone", folder / t.name), ("sweep", folder / "S" / t.name)):
                for stage, seconds in json.loads((out / "metrics.json").read_text())["timings_s"].items():
                    stages.setdefault(stage, {}).setdefault(name, []).append(seconds / len(trials))
            records = json.loads((folder / "S" / t.name / "stages.json").read_text())
            taken += sum("reused_from" in r for r in records.values())
        print(f"stages the sweep's trials took from each other instead of making: {taken}")
        print(f"{'stage':<16}{'alone s':>9}{'in sweep s':>12}   (mean over trials)")
        for stage, times in stages.items():
            if stage != "this_invocation":
                print(f"{stage:<16}{sum(times['alone']):>9.1f}{sum(times['sweep']):>12.1f}")
    ratio = sweep / one_by_one
    print(f"ratio sweep / one after another: {ratio:.2f} (target <= 0.65: {'met' if ratio <= 0.65 else 'not met'})")


if __name__ == "__main__":
    main()
