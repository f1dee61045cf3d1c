import math

import torch
import torch.nn.functional as F

from latentlab import data, pixels
from latentlab.autoencoder import load_autoencoder, train_autoencoder
from latentlab.config import AutoencoderConfig
from latentlab.models import Autoencoder


def _batch(n=64):
    return pixels.to_float(data.load().train_images[:n])


def test_shapes_and_range():
    ae = Autoencoder(latent_dim=16, width=8)
    x = _batch(5)
    z = ae.encoder(x)
    assert z.shape == (5, 16)
    out = ae.decoder(z)
    assert out.shape == (5, 1, 28, 28) and out.min() >= 0 and out.max() <= 1


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    ae = Autoencoder(latent_dim=16, width=8)
    x = _batch()
    optimizer = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(ae.decoder.logits(ae.encoder(x)), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses))
    assert losses[-1] < 0.6 * losses[0]


def test_same_seed_same_numbers():
    cfg = AutoencoderConfig(latent_dim=8, width=4, epochs=1, batch_size=64)
    x = _batch(256)
    _, h1 = train_autoencoder(cfg, x, x[:64], seed=3)
    _, h2 = train_autoencoder(cfg, x, x[:64], seed=3)
    _, h3 = train_autoencoder(cfg, x, x[:64], seed=4)
    assert h1 == h2 and h1 != h3


def test_checkpoint_reloads_to_identical_outputs(tiny_run):
    a = load_autoencoder(tiny_run)
    b = load_autoencoder(tiny_run)
    x = _batch(8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    metrics = tiny_run.metrics()["autoencoder"]
    assert metrics["latent_dim"] == 16 and 0 < metrics["test_mse"] < 0.2
