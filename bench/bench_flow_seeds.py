"""The flow trained with several seeds on a finished run's codes, each scored with that run's classifier
(10k samples against the test images): how much a change to the flow's training moves its scores beyond a
seed's luck.

    python bench/bench_flow_seeds.py --run runs/mnist-seed0 --seeds 1,2,3 [--set flow.steps=2000]... [--device cuda]
"""
import argparse
import json
import time

import numpy as np
import torch

from latentlab import flow
from latentlab.classifier import load_classifier
from latentlab.cli import apply_settings
from latentlab.config import from_dict
from latentlab.context import Context, resolve_device
from latentlab.evaluate import conditional_quality, reference_of_test_images, unconditional_quality
from latentlab.runfolder import Run, read_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--set", action="append", default=[], metavar="flow.KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the flow stage trains
    run = Run(args.run)
    config = from_dict(read_json(run.root / "config.json"))
    apply_settings(config, args.set)
    ctx = Context(run=run, config=config, device=resolve_device(args.device), threads=1)
    classifier = load_classifier(run).to(ctx.device)
    real = reference_of_test_images(ctx, classifier)
    cfg, codes, stats = config.flow, ctx.standardised_codes("train"), ctx.code_stats
    labels = torch.from_numpy(ctx.labels("train")).long().to(ctx.device)
    digits = np.arange(10_000) % 10
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        model, history = flow.train_flow(cfg, codes, labels, seed=seed, device=ctx.device)
        torch.cuda.synchronize() if ctx.device.type == "cuda" else None
        seconds = time.perf_counter() - start
        trained = flow.LatentFlow.from_config(model, stats, cfg)
        decoder = ctx.autoencoder.decoder
        chosen = conditional_quality(classifier, real, flow.sample_images(trained, decoder, 10_000, digit=digits,
                                                                           seed=1), digits)
        free = unconditional_quality(classifier, real, flow.sample_images(trained, decoder, 10_000, seed=1))
        extra = {}
        if model.digit_head is not None:  # the same net's "no digit" field, for comparison
            head, model.digit_head = model.digit_head, None
            field = unconditional_quality(classifier, real, flow.sample_images(trained, decoder, 10_000, seed=1))
            model.digit_head = head
            extra = {"field_frechet_distance": round(field["frechet_distance"], 2), "field_recall": round(field["recall"], 3),
                     "final_digit_loss": history["digit_loss"][-1]}
        print(json.dumps({"seed": seed, **{k: v for k, v in (x.split("=", 1) for x in args.set)},
                          "train_seconds": round(seconds, 1),
                          "frechet_distance": round(chosen["frechet_distance"], 2), "recall": round(chosen["recall"], 3),
                          "accuracy": chosen["accuracy"], "min_digit_accuracy": chosen["min_digit_accuracy"],
                          "no_digit_frechet_distance": round(free["frechet_distance"], 2),
                          "no_digit_recall": round(free["recall"], 3),
                          "no_digit_shares": [round(h, 3) for h in free["class_histogram"]], **extra}), flush=True)


if __name__ == "__main__":
    main()
