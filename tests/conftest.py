"""Shared fixtures: tiny configs and a tiny trained run on a slice of the real MNIST, made once per session."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from latentlab.config import make_config  # noqa: E402
from latentlab.pipeline import Pipeline  # noqa: E402
from latentlab.runfolder import Run  # noqa: E402

torch.set_num_threads(1)


def tiny_config(**top):
    """Settings small enough for a test: a few hundred steps on a few thousand images."""
    config = make_config(**top)
    config.device = "cpu"
    config.autoencoder.epochs = 1
    config.autoencoder.train_limit = 2000
    config.autoencoder.width = 8
    config.autoencoder.latent_dim = 16
    config.classifier.epochs = 1
    config.classifier.train_limit = 2000
    config.fewshot.draws = 2
    config.fewshot.epochs = 5
    config.gan.steps = config.cgan.steps = 50
    config.gan.batch_size = config.cgan.batch_size = 64
    config.interpolation.pairs = 4
    config.evaluation.samples = 200
    return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with a tiny trained autoencoder. Tests that change it must copy it first."""
    run = Run(tmp_path_factory.mktemp("tiny_run"), create=True)
    pipeline = Pipeline(run, tiny_config())
    pipeline.write_config()
    pipeline.run_stage("autoencoder")
    return run
