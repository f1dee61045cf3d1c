"""How much the judge moves the scores: judging classifiers trained as `--set classifier.seed=S` would train them
(each its seed's split) score the same images of a finished run's generators, beside the run's own judge.

    python bench/bench_judges.py --run runs/mnist-seed0 --seeds 1,2,3

Prints, per judge, its test accuracy and the Frechet distance (and recall) of 10,000 decoded training codes (the
exact-codes floor), the conditional and plain GANs' samples, and the flow's with and without a digit. The images
are drawn once (noise of seed 1), so only the judge differs between the lines.
"""
import argparse
import dataclasses
import json

import numpy as np
import torch

from latentlab import flow, gan, pixels
from latentlab.classifier import accuracy, features, load_classifier, train_judge
from latentlab.config import from_dict
from latentlab.context import Context, resolve_device
from latentlab.evaluate import conditional_quality, unconditional_quality
from latentlab.metrics import Reference
from latentlab.models import decode
from latentlab.runfolder import Run, read_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--seeds", default="1,2,3", help="judges' seeds to train beside the run's own judge")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the classifier trains beside the other stages
    run = Run(args.run)
    config = from_dict(read_json(run.root / "config.json"))
    ctx = Context(run=run, config=config, device=resolve_device("cpu"), threads=1)
    decoder, count = ctx.autoencoder.decoder, 10_000
    digits = np.arange(count) % 10
    chosen = torch.from_numpy(np.random.default_rng(0).choice(len(ctx.codes("train")), count, replace=False))
    conditional = {"cgan": gan.sample_images(gan.load_gan(run, conditional=True), decoder, count, digit=digits, seed=1),
                   "flow": flow.sample_images(flow.load_flow(run), decoder, count, digit=digits, seed=1)}
    free = {"exact_codes": pixels.to_uint8(decode(decoder, ctx.codes("train")[chosen])),
            "gan": gan.sample_images(gan.load_gan(run, conditional=False), decoder, count, seed=1),
            "flow_no_digit": flow.sample_images(flow.load_flow(run), decoder, count, seed=1)}

    judges = {f"run's (seed {config.classifier.seed})": load_classifier(run)}
    for seed in (int(s) for s in args.seeds.split(",")):
        judges[f"seed {seed}"], _, _ = train_judge(ctx, dataclasses.replace(config.classifier, seed=seed))
    for name, judge in judges.items():
        judge.eval()
        real = Reference(features(judge, ctx.images("test")), k=config.evaluation.k)
        line = {"judge": name, "test_accuracy": round(accuracy(judge, ctx.images("test"), ctx.labels("test")), 4)}
        for kind, images in {**conditional, **free}.items():
            q = (conditional_quality(judge, real, images, digits) if kind in conditional
                 else unconditional_quality(judge, real, images))
            line[kind] = [round(q["frechet_distance"], 2), round(q["recall"], 3)]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
