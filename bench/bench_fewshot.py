"""Run the fewshot stage on a copy of a trained run folder; print its time, per-part times and accuracies.

    python bench/bench_fewshot.py [--run /tmp/base] [--set fewshot.draws=3 ...]

The run folder is copied first (its metrics, figures and config stay as they were). Wall times are
inflated by other load on the machine: the load average is printed beside them.
"""
import argparse
import os
import shutil
import tempfile
import time

from latentlab.cli import apply_settings
from latentlab.config import from_dict, validate
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run, read_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="/tmp/base", help="a run folder with a trained autoencoder")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fewshot-") as folder:
        root = shutil.copytree(args.run, os.path.join(folder, "run"), ignore=shutil.ignore_patterns(".lock"))
        run = Run(root)
        config = from_dict(read_json(run.root / "config.json"))
        apply_settings(config, args.set)
        validate(config)
        cpu_start, start = time.process_time(), time.perf_counter()
        fs = Pipeline(run, config).run_stage("fewshot")["fewshot"]
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"fewshot stage: {seconds:.1f} s wall, {cpu:.1f} s CPU (main thread's process time), "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; draws={fs['draws']} "
          f"({fs['draw']}), epochs={fs['epochs']}, end-to-end draws={fs['end_to_end_draws']}")
    print("parts (s): " + ", ".join(f"{k} {v}" for k, v in fs["timings_s"].items()))
    print(f"{'method':28s} {'mean':>7s} {'std':>7s} {'worst':>7s}")
    for name, info in sorted(fs["methods"].items(), key=lambda kv: -kv[1]["test_accuracy"]["mean"]):
        acc = info["test_accuracy"]
        print(f"{name:28s} {acc['mean']:7.4f} {acc['std']:7.4f} {acc['min']:7.4f}"
              + ("   <- best" if name == fs["best_method"] else ""))
    curves = fs["curves"]
    print(f"reference MLP, final validation accuracy on {curves['val_images']} images: frozen "
          f"{curves['seed_mlp_frozen']['mean'][-1]:.4f}, end to end {curves['seed_mlp_end_to_end']['mean'][-1]:.4f} "
          f"(reference report: {fs['reference']['seed_mlp_frozen']}, {fs['reference']['seed_mlp_end_to_end']})")


if __name__ == "__main__":
    main()
