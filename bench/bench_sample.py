"""Sampling benchmark: throughput (images/s, generator + decoder, warm) and cold `latentlab sample` latency.

    python bench/bench_sample.py                 # on a temporary run with the default model sizes
    python bench/bench_sample.py --run runs/X    # on a trained run
    python bench/bench_sample.py --quick         # fewer repeats

Speed does not depend on what the weights learned, so without --run the models are freshly initialised at
the default sizes (and saved as real checkpoints); the cold latency is a new Python process each time,
`python -m latentlab sample --count 64 --out FILE.png`, imports and model loading included.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from latentlab import gan as gan_module
from latentlab.config import make_config
from latentlab.models import Autoencoder, Generator
from latentlab.runfolder import Run


def make_untrained_run(folder: Path) -> Run:
    """A run folder holding default-sized AE and GAN checkpoints with their initial weights."""
    config = make_config()
    run = Run(folder, create=True)
    ae = config.autoencoder
    model = Autoencoder(latent_dim=ae.latent_dim, width=ae.width)
    run.save_checkpoint("autoencoder", {"kind": "autoencoder", "model_args": {"latent_dim": ae.latent_dim, "width": ae.width},
                                        "state_dict": model.state_dict()})
    for name, num_classes in (("gan", 0), ("cgan", 10)):
        cfg = getattr(config, name)
        generator = Generator(cfg.noise_dim, ae.latent_dim, cfg.hidden, num_classes)
        mean, std = torch.zeros(ae.latent_dim), torch.ones(ae.latent_dim)
        run.save_checkpoint(name, gan_module.checkpoint(generator, cfg, mean, std, kind=name, step=cfg.steps))
    return run


def throughput(run: Run, count: int, repeats: int, threads: int, conditional: bool) -> float:
    """Best of `repeats`: images/s of noise -> generator -> decoder -> uint8, in a warm process."""
    torch.set_num_threads(threads)
    gan, decoder = gan_module.load_gan(run, conditional=conditional), gan_module.load_decoder(run)
    digit = 3 if conditional else None
    gan_module.sample_images(gan, decoder, 256, digit=digit)  # warm-up
    best = float("inf")
    for seed in range(repeats):
        start = time.perf_counter()
        gan_module.sample_images(gan, decoder, count, digit=digit, seed=seed)
        best = min(best, time.perf_counter() - start)
    return count / best


def cold_latency(run: Run, out: Path, repeats: int, digit: int | None) -> list[float]:
    """Wall seconds of whole `latentlab sample --count 64` processes, one after another."""
    command = [sys.executable, "-m", "latentlab", "sample", "--run", str(run.root), "--count", "64", "--out", str(out)]
    if digit is not None:
        command += ["--digit", str(digit)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run folder (default: a temporary one with untrained default-size models)")
    parser.add_argument("--count", type=int, default=10_000, help="images per throughput measurement")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as folder:
        run = Run(args.run) if args.run else make_untrained_run(Path(folder) / "run")
        print(f"run: {run.root}{'' if args.run else ' (untrained, default sizes)'}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine inflates every number)")
        print(f"{'throughput, generator + decoder':<40}{'images/s':>12}")
        for conditional in (False, True):
            for threads in (1, 2):
                rate = throughput(run, args.count, repeats, threads, conditional)
                label = f"{'cGAN' if conditional else 'GAN'}, {threads} thread{'s' if threads > 1 else ''}, {args.count} images"
                print(f"{label:<40}{rate:>12,.0f}")
        times = cold_latency(run, Path(folder) / "samples.png", repeats, digit=None)
        times_digit = cold_latency(run, Path(folder) / "samples.png", repeats, digit=7)
        print(f"cold `latentlab sample --count 64 --out x.png`: median {statistics.median(times):.2f} s, "
              f"best {min(times):.2f} s (target <= 3 s); with --digit 7: median {statistics.median(times_digit):.2f} s")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        print(f"of which `import torch` alone: {time.perf_counter() - start:.2f} s (one cold process)")


if __name__ == "__main__":
    main()
