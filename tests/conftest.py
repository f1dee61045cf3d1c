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
    config.classifier.epochs = 2          # ~50 steps: fewer leave the one-cycle classifier at chance
    config.classifier.train_limit = 3000
    config.classifier.width = 8
    config.fewshot.draws = 2
    config.fewshot.epochs = 5
    config.gan.steps = config.cgan.steps = 50
    config.flow.steps, config.flow.hidden, config.evaluation.flow_sweep_samples = 100, 64, 100
    config.gan.batch_size = config.cgan.batch_size = 64
    config.interpolation.pairs = 4
    config.evaluation.samples = 200
    config.evaluation.gmm_components = 5
    config.evaluation.gmm_components_per_digit = 2
    return config


def trained_run(folder, config, stages) -> Run:
    """A new run folder with `config` written and `stages` run in order."""
    run = Run(folder, create=True)
    pipeline = Pipeline(run, config)
    pipeline.write_config()
    for stage in stages:
        pipeline.run_stage(stage)
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with a tiny trained autoencoder. Tests that change it must copy it first."""
    return trained_run(tmp_path_factory.mktemp("tiny_run"), tiny_config(), ["autoencoder"])


@pytest.fixture(scope="session")
def gan_run(tiny_run, tmp_path_factory):
    """The tiny run plus a classifier, both tiny GANs (50 steps) and the flow. Tests that change it must copy it first."""
    import shutil

    run = Run(shutil.copytree(tiny_run.root, tmp_path_factory.mktemp("gan_run") / "run"))
    pipeline = Pipeline(run, tiny_config())
    for stage in ("classifier", "gan", "cgan", "flow"):
        pipeline.run_stage(stage)
    return run


def demo_config():
    """Small, but trained enough that the classifier reads the conditional GAN's digits (~90%): the demo's tests."""
    config = tiny_config()
    config.autoencoder.train_limit = 10_000
    config.autoencoder.epochs = 2
    config.autoencoder.batch_size = 64
    config.autoencoder.width = 16
    config.classifier.train_limit = 10_000
    config.gan.steps = 300
    config.cgan.steps = 2000
    config.flow.steps = 1500
    # plain guidance, as before rescaling was the default: this small flow (64 wide, 16-D codes) reads as asked
    # 94.0% that way against 92.3% rescaled at 2.5, and the tests read single samples back (docs/flow_sweep.md)
    config.flow.guidance, config.flow.guidance_rescale = 1.5, 0.0
    for gan in (config.gan, config.cgan):
        gan.batch_size, gan.lr, gan.noise_dim = 128, 1e-3, 32
    return config


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A run with an AE, classifier, both GANs, the flow and a report, for the web demo's tests (~55 s of CPU time)."""
    return trained_run(tmp_path_factory.mktemp("demo_run"), demo_config(),
                       ["autoencoder", "classifier", "gan", "cgan", "flow", "report"])
