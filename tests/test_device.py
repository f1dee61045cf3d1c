"""Device plumbing, tested without a GPU: data and models follow the run's device (PyTorch's "meta" device
stands in for a second one: shapes without storage), and the training loops read the device back only a
bounded number of times, not once a step."""
import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from latentlab.autoencoder import train_autoencoder
from latentlab.classifier import train_classifier
from latentlab.config import AutoencoderConfig, ClassifierConfig, GANConfig
from latentlab.context import Context
from latentlab.fewshot import nearest, whiten
from latentlab.gan import LatentGAN, generate_codes, train_gan
from latentlab.models import CodeStats, Generator
from tests.conftest import tiny_config

HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts latentlab's calls that copy a tensor's value to the host (each a sync with a GPU).

    torch's own reads are left out: the CPU optimiser reads its step counter, a CPU tensor (on CUDA the
    loop's optimisers are capturable and keep it on the device).
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            self.count += not caller.startswith("torch")
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> int:
    with HostReads() as counter:
        fn()
    return counter.count


def test_context_keeps_images_models_and_codes_on_its_device(tiny_run):
    ctx = Context(tiny_run, tiny_config(), device=torch.device("meta"))
    assert ctx.images("val").device.type == "meta" and ctx.images("val").shape == (5000, 1, 28, 28)
    assert all(p.device.type == "meta" for p in ctx.autoencoder.parameters())
    codes = ctx.codes("val")
    assert codes.device.type == "meta" and codes.shape == (5000, 16)
    assert ctx.code_stats.mean.device.type == "meta" and ctx.standardised_codes("val").device.type == "meta"


def test_generated_codes_come_back_on_the_generators_device():
    generator = Generator(noise_dim=4, latent_dim=3, hidden=8, num_classes=10).to("meta")
    stats = CodeStats(torch.zeros(3, device="meta"), torch.ones(3, device="meta"))
    codes = generate_codes(LatentGAN(generator, stats, conditional=True), torch.randn(7, 4), torch.arange(7))
    assert codes.device.type == "meta" and codes.shape == (7, 3)


def test_neighbour_search_runs_where_the_codes_are():
    codes = torch.randn(50, 4, device="meta")
    embed = whiten(torch.randn(50, 4))
    assert embed(torch.randn(5, 4)).norm(dim=1).allclose(torch.ones(5))
    distances, indices = nearest(codes, codes, 3, exclude_self=True)
    assert distances.device.type == indices.device.type == "meta" and indices.shape == (50, 3)


@pytest.mark.parametrize("conditional", [False, True])
def test_gan_loop_reads_the_device_once_per_window_not_once_per_step(conditional):
    codes = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(500) % 10 if conditional else None

    def reads(steps):
        cfg = GANConfig(steps=steps, noise_dim=4, hidden=16, batch_size=32, log_every=50, checkpoint_every=10_000)
        return host_reads(lambda: train_gan(cfg, codes, labels, seed=0))

    short, long = reads(100), reads(200)
    per_window = (long - short) / 2  # two more windows of 50 steps
    assert per_window <= 10, f"{per_window} host reads per window of 50 steps"


def test_autoencoder_and_classifier_loops_read_the_device_per_epoch_not_per_step():
    images = torch.rand(640, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = np.arange(640) % 10
    one, two = (host_reads(lambda e=e: train_autoencoder(AutoencoderConfig(latent_dim=4, width=4, epochs=e,
                                                                          batch_size=32), images, images[:64], seed=0))
                for e in (1, 2))
    assert two - one <= 10  # an epoch of 20 steps adds a handful of reads, not one a step
    one, two = (host_reads(lambda e=e: train_classifier(ClassifierConfig(width=4, epochs=e, batch_size=32), images,
                                                        labels, images[:64], labels[:64], seed=0))
                for e in (1, 2))
    assert two - one <= 10


def test_cpu_inference_batches_keep_every_activation_under_the_mmap_threshold():
    """On the CPU, no activation of an inference batch may reach glibc's 32 MB mmap threshold: blocks that large
    are mapped and zeroed afresh on every pass (2,000 images per pass ran 2.3x slower). A GPU takes larger ones."""
    from latentlab.models import Autoencoder, DigitClassifier, inference_batch

    assert inference_batch(torch.device("cuda")) > inference_batch("cpu")
    images = torch.rand(inference_batch("cpu"), 1, 28, 28)
    sizes = []
    for model in (Autoencoder(), DigitClassifier()):
        for module in model.modules():
            if not list(module.children()):  # every layer's output
                module.register_forward_hook(lambda m, i, out: sizes.append(out.numel() * out.element_size()))
        with torch.no_grad():
            model.eval()(images)
    assert len(sizes) > 10 and max(sizes) < 32 * 2 ** 20
    assert max(sizes) > 4 * 2 ** 20  # and the batch is not so small that the passes cost more than the work


def test_stepper_runs_eagerly_then_replays_one_captured_step_on_each_steps_inputs(monkeypatch):
    """The CUDA path's plumbing with a stand-in for the graph: a few eager steps, one capture, then each call
    copies its inputs into the static buffers the graph reads and replays it; without capture, never a graph."""
    import latentlab.models as models

    seen, captures = [], []

    def step(x):
        seen.append(float(x[0]))

    class Replay:  # replays what was captured: `step` over the static buffers
        def __init__(self, fn, static):
            self.fn, self.static = fn, static

        def replay(self):
            self.fn(*self.static)

    def capture(fn, optimizers, *static):
        captures.append(static)
        return Replay(fn, static)

    monkeypatch.setattr(models, "capture_step", capture)
    static = (torch.zeros(2),)
    run = models.stepper(step, [], static, capture=True, warmup=3)
    for i in range(7):
        run(torch.full((2,), float(i)))
    assert len(captures) == 1 and captures[0][0] is static[0]  # the buffers themselves, refilled each step
    assert seen == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # three eager steps, then four replays of each step's inputs
    seen.clear()
    eager = models.stepper(step, [], static, capture=False)
    for i in range(5):
        eager(torch.full((2,), float(i)))
    assert seen == [0.0, 1.0, 2.0, 3.0, 4.0] and len(captures) == 1
