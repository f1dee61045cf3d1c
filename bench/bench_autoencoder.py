"""Autoencoder benchmark: training throughput (images/s) and the wall time of one default AE stage.

    python bench/bench_autoencoder.py            # throughput + a full default stage (about a minute)
    python bench/bench_autoencoder.py --quick    # throughput only
"""
import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from latentlab import data, pixels
from latentlab.config import make_config
from latentlab.context import set_threads
from latentlab.models import Autoencoder
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run


def throughput(steps: int = 60, batch_size: int = 128) -> float:
    set_threads(2)
    cfg = make_config().autoencoder
    model = Autoencoder(latent_dim=cfg.latent_dim, width=cfg.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x = pixels.to_float(data.load().train_images[:batch_size])
    for step in range(steps + 5):
        if step == 5:  # warm-up done
            start = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model.decoder.logits(model.encoder(x)), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="throughput only")
    args = parser.parse_args()
    print(f"autoencoder training throughput: {throughput():,.0f} images/s (2 threads, batch 128)")
    if not args.quick:
        with tempfile.TemporaryDirectory() as folder:
            config = make_config()
            pipeline = Pipeline(Run(folder, create=True), config)
            start = time.perf_counter()
            pipeline.run_stage("autoencoder")
            seconds = time.perf_counter() - start
            mse = pipeline.run.metrics()["autoencoder"]["test_mse"]
        print(f"default autoencoder stage: {seconds:.1f} s wall, test MSE {mse:.5f} "
              f"(latent {config.autoencoder.latent_dim}, {config.autoencoder.epochs} epochs)")


if __name__ == "__main__":
    main()
