"""All benchmarks: the stage benchmarks, then the whole default pipeline in a fresh folder, as one table.

    python bench/run_all.py              # everything (the default pipeline takes a few minutes)
    python bench/run_all.py --quick      # the pipeline with --quick, and the stage benchmarks' quick modes
    python bench/run_all.py --no-stages  # only the pipeline

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


def pipeline_table(quick: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
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
    print(f"\nthe {'quick' if quick else 'default'} pipeline (`{' '.join(cmd[3:5])} ...`):")
    print(f"{'stage':<15}{'wall s':>9}{'peak MB':>10}  throughput")
    for name, record in stages.items():
        print(f"{name:<15}{record['seconds']:>9.1f}{record.get('peak_rss_mb', 0):>10.0f}  {throughput.get(name, '')}")
    print(f"{'total':<15}{wall:>9.1f}{usage.ru_maxrss / 1024:>10.0f}  (whole process, import and start-up included)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage benchmarks")
    args = parser.parse_args()
    if not args.no_stages:
        for script in sorted(HERE.glob("bench_*.py")):
            print(f"\n== {script.name}", flush=True)
            subprocess.run([sys.executable, str(script)] + (["--quick"] if args.quick else []), check=False)
    pipeline_table(args.quick)


if __name__ == "__main__":
    main()
