"""The networks: plain nn.Modules, each rebuilt from the keyword arguments stored in its checkpoint; batched
inference; and the code statistics that standardise the AE's codes for the generators."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def inference_batch(device) -> int:
    """Inputs per forward pass without gradients. A GPU wants large batches. On the CPU a conv layer's
    activations must stay under glibc's 32 MB mmap threshold: larger blocks are mapped and zeroed afresh on
    every call (2000 images per pass encoded and classified 2.3x slower than 256, most of it system time)."""
    return 4096 if torch.device(device).type == "cuda" else 256


@torch.no_grad()
def batched(fn, inputs: torch.Tensor, device, batch_size: int | None = None) -> torch.Tensor:
    """fn over `inputs` in batches on `device`, without gradients; the results stay on `device`."""
    batch_size = batch_size or inference_batch(device)
    return torch.cat([fn(inputs[i:i + batch_size].to(device, non_blocking=True))
                      for i in range(0, len(inputs), batch_size)])


def adam(params, **options) -> torch.optim.Adam:
    """Adam in its fused form, one kernel per tensor (CPU) or for all tensors (CUDA) for the whole update instead
    of ~10 ops per tensor: on the CPU the cGAN's G and D updates took 758 -> 216 us (GAN steps 5-15% faster, the
    flow's 13%); on an H200 the cGAN's captured steps ran 1,456 -> 1,983 a second."""
    return torch.optim.Adam(params, fused=True, **options)


def capture_step(step, optimizers, *static) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `step(*static)`: a training step (forward, backward, optimizer; or only the first two) in
    one launch. A small net's step is ~100-200 kernels, and launching them one by one costs more than running them.
    Call it after a few eager steps (they choose cuDNN's kernels and create the optimizers' state, which must be
    capturable); then fill the `static` tensors and replay. Gradients are set to None first, so that the graph
    owns the buffers its backward writes and its optimizer steps read."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, stream=stream):
            step(*static)
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def stepper(step, optimizers, static: tuple, *, capture: bool, warmup: int = 3):
    """`step` as a function to call once per training step with that step's inputs. With `capture` (CUDA), the
    first `warmup` calls run eagerly, the next captures `step` in a CUDA graph (capture_step) over the `static`
    buffers, and every call from then on copies its inputs into them and replays the graph."""
    graph, calls = None, 0

    def run(*inputs) -> None:
        nonlocal graph, calls
        calls += 1
        if capture and graph is None and calls > warmup:
            graph = capture_step(step, optimizers, *static)
        if graph is None:
            step(*inputs)
            return
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
    return run


def ema_decay(step, ema: float):
    """The decay of a weight average at update `step` (the GANs count from 0, the flow from 1): it grows from 0.1
    towards `ema`, so a short run's average does not keep its random start (0.999 ** 400 = 67%). `step` an int,
    or a device tensor (the GANs' CUDA graphs): the result is of the same kind."""
    warm = (1 + step) / (10 + step)
    return warm.clamp(max=ema) if torch.is_tensor(warm) else min(ema, warm)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def decode(decoder, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Codes (N, latent_dim) -> images (N, 1, 28, 28) in [0, 1], on the decoder's device."""
    return batched(decoder.eval(), codes, device_of(decoder), batch_size)


@dataclass
class CodeStats:
    """Per-dimension mean and std of the training codes: the generators work in standardised codes."""
    mean: torch.Tensor   # (latent_dim,)
    std: torch.Tensor    # (latent_dim,)

    @classmethod
    def of(cls, codes: torch.Tensor) -> "CodeStats":
        return cls(codes.mean(0), codes.std(0))

    def standardise(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.mean.to(codes.device)) / self.std.to(codes.device)

    def restore(self, standard: torch.Tensor) -> torch.Tensor:
        return standard * self.std.to(standard.device) + self.mean.to(standard.device)


# Conv weights stored channels-last: the convolutions then run in that layout whatever the input's, and the
# same computation runs 1.3-1.6x faster on the CPU (AE training step 79 -> 59 ms, classifying 256 images 78 -> 47 ms
# on one thread); GPUs prefer it too.
CONV_FORMAT = torch.channels_last


class Encoder(nn.Module):
    """(B, 1, 28, 28) in [0, 1] -> (B, latent_dim)."""

    def __init__(self, *, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),              # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),      # (B, 2w, 7, 7)
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, latent_dim),
        )
        self.latent_dim = latent_dim
        self.to(memory_format=CONV_FORMAT)

    def forward(self, x):
        return self.net(x)

    def with_features(self, x) -> torch.Tensor:
        """(B, latent_dim + 34 w) for B images: each code, then its conv layers' activations average-pooled to a
        4 x 4 and a 3 x 3 grid of cells. A label-free description of where the strokes lie, for a linear learner
        (fewshot's self-training: 98.5% on 50 labels where the codes' own vote gives 98.3%)."""
        first = self.net[:2](x)                   # (B, w, 14, 14)
        second = self.net[2:4](first)             # (B, 2w, 7, 7)
        return torch.cat([self.net[4:](second), F.adaptive_avg_pool2d(first, 4).flatten(1),
                          F.adaptive_avg_pool2d(second, 3).flatten(1)], 1)


class Decoder(nn.Module):
    """(B, latent_dim) -> (B, 1, 28, 28) in [0, 1]. Mirrors the encoder."""

    def __init__(self, *, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * 7 * 7), nn.LeakyReLU(0.2),
            nn.Unflatten(1, (2 * width, 7, 7)),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # (B, w, 14, 14)
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),                            # (B, 1, 28, 28)
        )
        self.to(memory_format=CONV_FORMAT)

    def forward(self, z):
        return torch.sigmoid(self.net(z))

    def logits(self, z):
        return self.net(z)


class Autoencoder(nn.Module):
    def __init__(self, *, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.encoder = Encoder(latent_dim=latent_dim, width=width)
        self.decoder = Decoder(latent_dim=latent_dim, width=width)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class DigitClassifier(nn.Module):
    """The project's judge of generated digits: three conv blocks -> a feature layer -> 10 logits.

    `features` (the penultimate activations) is the space for Frechet distance and precision/recall.
    """

    def __init__(self, *, width: int = 16, feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()

        def block(c_in, c_out):  # conv + batch norm + ReLU, then halve the resolution
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.MaxPool2d(2, ceil_mode=True)]

        self.body = nn.Sequential(
            *block(1, width), *block(width, 2 * width), *block(2 * width, 4 * width),  # 28 -> 14 -> 7 -> 4
            nn.Flatten(),
            nn.Linear(4 * width * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 10))
        self.to(memory_format=CONV_FORMAT)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


class Generator(nn.Module):
    """Gaussian noise (B, noise_dim) -> a standardised latent code (B, latent_dim).

    Conditional (num_classes > 0): the digit's one-hot vector is joined to the noise.
    """

    def __init__(self, noise_dim: int = 64, latent_dim: int = 32, hidden: int = 256, num_classes: int = 0):
        super().__init__()
        self.noise_dim, self.latent_dim, self.num_classes = noise_dim, latent_dim, num_classes
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, latent_dim),
        )

    def forward(self, noise, labels=None):
        if self.num_classes:
            noise = torch.cat([noise, nn.functional.one_hot(labels, self.num_classes).to(noise.dtype)], 1)
        return self.net(noise)


class Discriminator(nn.Module):
    """A latent code (B, latent_dim) -> one realness logit per code (B,).

    Conditional (num_classes > 0): a projection discriminator (Miyato & Koyama 2018): the logit gains the
    inner product of a learned digit embedding with the code's features. Measured against joining a one-hot
    digit to the code, it gave far better conditional samples (the measurements are listed in gan.py).
    """

    def __init__(self, latent_dim: int = 32, hidden: int = 256, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
        )
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes, hidden) if num_classes else None

    def forward(self, codes, labels=None):
        features = self.body(codes)
        logits = self.out(features).squeeze(1)
        if self.embed is not None:
            logits = logits + (self.embed(labels) * features).sum(1)
        return logits
