"""Make the judge shipped with latentlab (src/latentlab/judge/): the classifier stage with the default settings on
the shipped MNIST, trained (classifier.shipped=false), then its checkpoint, its metrics section and the settings
it was made with written beside the package. About 50 s on 2 CPU cores.

    python scripts/ship_judge.py              # trains it in a temporary run folder
    python scripts/ship_judge.py --run DIR    # ships the judge a run trained (the default settings, shipped=false)

Runs take it where their settings are these (classifier.shipped, the default): see classifier.shipped_judge.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from latentlab.checks import config_from_json
from latentlab.classifier import judge_settings, ship
from latentlab.config import ClassifierConfig
from latentlab.runfolder import Run
from latentlab.sweep import thread_env


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", metavar="DIR", help="a run folder whose judge was trained with the default settings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.run or temporary)
        if not args.run:
            # one thread, as the judge trains beside the autoencoder in a default run on 2 CPU cores: the same
            # bytes as that run's judge (threads change the order of float sums)
            subprocess.run([sys.executable, "-m", "latentlab", "train-classifier", "--run", str(folder),
                            "--set", "classifier.shipped=false"], check=True, env={**os.environ, **thread_env(1)})
        config = config_from_json(folder / "config.json")
        default = ClassifierConfig()
        if (config.data_dir is not None or config.classifier.shipped
                or judge_settings(config.classifier) != judge_settings(default)):
            sys.exit(f"{folder}: not a judge trained here with the default settings on the shipped MNIST")
        record = ship(Run(folder), default)
    print(f"shipped: test accuracy {record['made']['test_accuracy']:.4f}, sha256 {record['sha256'][:16]}...")


if __name__ == "__main__":
    main()
