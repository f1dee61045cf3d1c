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


def test_saved_codes_serve_only_their_own_autoencoder(tiny_run, tmp_path):
    import shutil

    from latentlab.autoencoder import encode
    from latentlab.context import Context, read_codes
    from latentlab.runfolder import Run
    from tests.conftest import tiny_config

    run = Run(shutil.copytree(tiny_run.root, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))
    ctx = Context(run, tiny_config())
    saved = read_codes(run, ctx.autoencoder)
    assert set(saved) == {"train", "val", "test"}
    assert torch.allclose(saved["val"], encode(ctx.autoencoder.encoder, ctx.images("val")), atol=1e-5)
    # another autoencoder in the checkpoint: the saved codes are not its codes, so they are not used
    other = load_autoencoder(run)
    torch.nn.init.zeros_(other.encoder.net[-1].bias)
    ckpt = torch.load(run.checkpoints / "autoencoder.pt", weights_only=True)
    ckpt["state_dict"] = other.state_dict()
    run.save_checkpoint("autoencoder", ckpt)
    ctx = Context(run, tiny_config())
    assert read_codes(run, ctx.autoencoder) == {}
    assert torch.allclose(ctx.codes("val"), encode(ctx.autoencoder.encoder, ctx.images("val")), atol=1e-6)


def test_a_run_folder_reused_with_another_seed_gets_that_seeds_split(tiny_run, tmp_path):
    import shutil

    import numpy as np

    from latentlab.context import Context
    from latentlab.runfolder import Run
    from tests.conftest import tiny_config

    run = Run(shutil.copytree(tiny_run.root, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))
    seed0 = Context(run, tiny_config()).split
    assert np.array_equal(seed0["train"], data.split_indices(0)["train"])
    config = tiny_config()
    config.seed = 5
    seed5 = Context(run, config).split
    assert np.array_equal(seed5["val"], data.split_indices(5)["val"]) and not np.array_equal(seed5["val"], seed0["val"])
    with np.load(run.root / "split.npz") as f:  # rewritten, with the seed it was drawn with
        assert int(f["seed"]) == 5 and np.array_equal(f["val"], seed5["val"])
