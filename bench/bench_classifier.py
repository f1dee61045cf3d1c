"""Train the digit classifier on the 55k training split with 2 threads; print its time and test accuracy.

    python bench/bench_classifier.py [--epochs 3] [--width 16] [--lr 5e-3] [--batch-size 128] [--seed 0]
"""
import argparse
import os
import tempfile
import time

from latentlab.classifier import accuracy, train_classifier
from latentlab.config import ClassifierConfig, make_config
from latentlab.context import Context, set_threads
from latentlab.runfolder import Run


def main():
    defaults = ClassifierConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    cfg = ClassifierConfig(epochs=args.epochs, width=args.width, lr=args.lr, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-classifier-") as folder:  # holds only the split file
        ctx = Context(run=Run(folder, create=True), config=make_config(seed=args.seed))
        train, val, test = ctx.images("train"), ctx.images("val"), ctx.images("test")
        train_labels, val_labels, test_labels = ctx.labels("train"), ctx.labels("val"), ctx.labels("test")
    start, cpu_start = time.perf_counter(), time.process_time()
    # the same sub-seed as the pipeline stage (seed + 1)
    model, history = train_classifier(cfg, train, train_labels, val, val_labels, seed=args.seed + 1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test = accuracy(model, test, test_labels)
    print(f"classifier width={cfg.width} epochs={cfg.epochs} lr={cfg.lr} batch={cfg.batch_size} "
          f"threads={args.threads}: train {seconds:.1f} s wall ({cpu_seconds:.1f} s CPU), "
          f"val accuracy {history['val_accuracy']}, test accuracy {test:.4f}, "
          f"load average {os.getloadavg()[0]:.2f} (others' load inflates the wall time)")


if __name__ == "__main__":
    main()
