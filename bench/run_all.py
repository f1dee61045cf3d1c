"""All benchmarks: the whole default pipeline in a fresh folder (stage, wall s, peak MB, throughput),
then each stage benchmark on that trained run.

    python bench/run_all.py              # the default pipeline and every benchmark (about 10 minutes)
    python bench/run_all.py --quick      # the pipeline with --quick, benchmarks in their quick modes
    python bench/run_all.py --no-stages  # only the pipeline table

Compare a change by running this before and after on the same quiet machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def pipeline_table(out: Path, quick: bool) -> None:
    cmd = [sys.executable, "-m", "latentlab", "run", "--out", str(out)] + (["--quick"] if quick else [])
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the pipeline failed: {' '.join(cmd)}")
    stages = json.loads((out / "stages.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    ae = metrics.get("autoencoder", {})
    throughput = {}
    if ae.get("train_seconds"):
        throughput["autoencoder"] = f"{ae['train_images'] * ae['epochs'] / ae['train_seconds']:,.0f} images/s (training)"
    print(f"\nthe {'quick' if quick else 'default'} pipeline:")
    print(f"{'stage':<15}{'wall s':>9}{'peak MB':>10}  throughput")
    for name, record in stages.items():
        print(f"{name:<15}{record['seconds']:>9.1f}{record.get('peak_rss_mb', 0):>10.0f}  {throughput.get(name, '')}")
    print(f"{'total':<15}{wall:>9.1f}{usage.ru_maxrss / 1024:>10.0f}  (whole process, start-up included; "
          "peak MB per stage is the process's peak so far)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage benchmarks")
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        pipeline_table(run, args.quick)
        if args.no_stages:
            return
        benchmarks = [
            ["bench_autoencoder.py", *quick],
            ["bench_classifier.py", *(["--epochs", "1"] if args.quick else [])],
            ["bench_fewshot.py", "--run", str(run)],
            ["bench_sample.py", "--run", str(run), *quick],
            ["bench_demo_load.py", "--run", str(run), *(["--requests", "40"] if args.quick else [])],
        ]
        for script, *script_args in benchmarks:
            print(f"\n== {script} {' '.join(script_args)}", flush=True)
            subprocess.run([sys.executable, str(HERE / script), *script_args], check=False)


if __name__ == "__main__":
    main()
