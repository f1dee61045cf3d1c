"""All benchmarks: the whole default pipeline in a fresh folder (stage, wall s, peak MB, throughput),
then each stage benchmark on that trained run.

    python bench/run_all.py                      # the default pipeline and every benchmark
    python bench/run_all.py --quick              # the pipeline with --quick, benchmarks in their quick modes
    python bench/run_all.py --no-stages          # only the pipeline table
    python bench/run_all.py --device cuda --no-stages   # the table on a GPU

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


def machine(device: str) -> str:
    """The device the table was measured on, in words, and the commit measured."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        where = f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPU cores"
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
        where = f"{os.cpu_count()} CPU cores ({model})"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    return f"{where}, torch {torch.__version__}, commit {commit.strip() or 'unknown'}"


def pipeline_table(out: Path, quick: bool, device: str, log: Path) -> None:
    """Run the pipeline into `out`, its output into `log` (its tail is printed if it fails), and print the table."""
    cmd = [sys.executable, "-m", "latentlab", "run", "--out", str(out), "--device", device] + (["--quick"] if quick else [])
    start = time.perf_counter()
    with open(log, "wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
        sys.exit(f"the pipeline failed after {wall:.1f} s: {' '.join(cmd)}\n" + "\n".join(tail))
    stages = json.loads((out / "stages.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    throughput = {}
    ae, gan, cgan = metrics.get("autoencoder", {}), metrics.get("gan", {}), metrics.get("cgan", {})
    if ae.get("train_seconds"):
        throughput["autoencoder"] = f"{ae['train_images'] * ae['epochs'] / ae['train_seconds']:,.0f} images/s (training)"
    for name, section in (("gan", gan), ("cgan", cgan)):
        if section.get("steps_per_second"):
            throughput[name] = f"{section['steps_per_second']:,.0f} steps/s"
    print(f"\nthe {'quick' if quick else 'default'} pipeline on {machine(device)}:")
    print(f"{'stage':<15}{'wall s':>9}{'cpu s':>9}{'peak MB':>10}  {'where':<8}throughput")
    for name, record in stages.items():
        where = "beside" if record.get("beside") else "main"
        print(f"{name:<15}{record['seconds']:>9.1f}{record.get('cpu_seconds', 0):>9.1f}"
              f"{record.get('peak_rss_mb', 0):>10.0f}  {where:<8}{throughput.get(name, '')}")
    print(f"{'total':<15}{wall:>9.1f}{usage.ru_utime + usage.ru_stime:>9.1f}{usage.ru_maxrss / 1024:>10.0f}  "
          "(whole process and its children, start-up included; wall counts stages side by side once)", flush=True)
    print("quality:", json.dumps(headline(metrics)), flush=True)


def headline(metrics: dict) -> dict:
    """The numbers a speed change must not move: the quality targets of the default study."""
    fewshot = metrics.get("fewshot", {}).get("methods", {})
    best = metrics.get("fewshot", {}).get("best_method")
    cgan = metrics.get("cgan", {}).get("quality", {})
    flow = metrics.get("flow", {})
    return {
        "ae_test_mse": metrics.get("autoencoder", {}).get("test_mse"),
        "classifier_test_accuracy": metrics.get("classifier", {}).get("test_accuracy"),
        "poisson_balanced": fewshot.get("poisson_balanced", {}).get("test_accuracy"),
        "cgan_accuracy": cgan.get("accuracy"), "cgan_min_digit": cgan.get("min_digit_accuracy"),
        "cgan_fd": cgan.get("frechet_distance"), "cgan_recall": cgan.get("recall"),
        "gan_fd": metrics.get("gan", {}).get("quality", {}).get("frechet_distance"),
        "gan_recall": metrics.get("gan", {}).get("quality", {}).get("recall"),
        "fewshot_best": {best: fewshot.get(best, {}).get("test_accuracy")} if best else None,
        "flow": {k: flow.get(q, {}).get(m) for k, q, m in (
            ("accuracy", "quality", "accuracy"), ("min_digit", "quality", "min_digit_accuracy"),
            ("fd", "quality", "frechet_distance"), ("recall", "quality", "recall"),
            ("no_digit_fd", "quality_unconditional", "frechet_distance"),
            ("no_digit_recall", "quality_unconditional", "recall"))} | {"train_seconds": flow.get("train_seconds")},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage benchmarks")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--keep", help="run the pipeline in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as folder:
        run = Path(args.keep) if args.keep else Path(folder) / "run"
        pipeline_table(run, args.quick, args.device, Path(folder) / "pipeline.log")
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
