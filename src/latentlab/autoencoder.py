"""Stage 1: train the convolutional autoencoder whose latent space every later stage works in."""
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from latentlab import figures
from latentlab.config import AutoencoderConfig
from latentlab.context import Context, set_threads
from latentlab.errors import LatentlabError
from latentlab.models import Autoencoder
from latentlab.runfolder import Run


@torch.no_grad()
def encode(encoder, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    encoder.eval()
    device = next(encoder.parameters()).device
    return torch.cat([encoder(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def decode(decoder, codes: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    decoder.eval()
    device = next(decoder.parameters()).device
    return torch.cat([decoder(codes[i:i + batch_size].to(device)).cpu() for i in range(0, len(codes), batch_size)])


@torch.no_grad()
def mean_loss(model, images: torch.Tensor, device, batch_size: int = 2000) -> tuple[float, float]:
    """(BCE per pixel, MSE per pixel) of the reconstructions of `images`."""
    model.eval()
    bce = mse = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        logits = model.decoder.logits(model.encoder(x))
        bce += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
        mse += F.mse_loss(torch.sigmoid(logits), x, reduction="sum").item()
    n = images.numel()
    return bce / n, mse / n


def train_autoencoder(cfg: AutoencoderConfig, train: torch.Tensor, val: torch.Tensor, *, seed: int,
                      device=torch.device("cpu")) -> tuple[Autoencoder, dict]:
    """Adam on per-pixel binary cross-entropy; returns the model and its per-epoch losses."""
    torch.manual_seed(seed)
    model = Autoencoder(latent_dim=cfg.latent_dim, width=cfg.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    history = {"train_bce": [], "val_bce": [], "val_mse": []}
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch < 1:
        raise LatentlabError(f"autoencoder: batch size {cfg.batch_size} is larger than the {len(train)} training images")
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="autoencoder", unit="step", leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            x = train[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]].to(device)  # (B, 1, 28, 28)
            loss = F.binary_cross_entropy_with_logits(model.decoder.logits(model.encoder(x)), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.update()
        val_bce, val_mse = mean_loss(model, val, device)
        history["train_bce"].append(total / steps_per_epoch)
        history["val_bce"].append(val_bce)
        history["val_mse"].append(val_mse)
        bar.set_postfix(epoch=epoch + 1, val_mse=f"{val_mse:.4f}")
    bar.close()
    return model, history


def checkpoint(model: Autoencoder, cfg: AutoencoderConfig) -> dict:
    return {"kind": "autoencoder", "model_args": {"latent_dim": cfg.latent_dim, "width": cfg.width},
            "state_dict": model.state_dict()}


def load_autoencoder(run: Run) -> Autoencoder:
    return run.load_model("autoencoder", Autoencoder, "train-ae")[0]


def stage(ctx: Context) -> dict:
    """Train the AE, save it, and report test MSE, per-epoch losses and a reconstructions figure."""
    cfg = ctx.config.autoencoder
    set_threads(2)
    train = ctx.images("train")
    if cfg.train_limit:
        train = train[:cfg.train_limit]
    start = time.perf_counter()
    model, history = train_autoencoder(cfg, train, ctx.images("val"), seed=ctx.config.seed, device=ctx.device)
    train_seconds = time.perf_counter() - start
    model = model.cpu().eval()
    ctx.run.save_checkpoint("autoencoder", checkpoint(model, cfg))
    ctx.__dict__.pop("autoencoder", None)  # later stages reload the saved one
    ctx.__dict__.pop("_codes", None)
    test = ctx.images("test")
    test_bce, test_mse = mean_loss(model, test, torch.device("cpu"))
    figures.reconstructions(test[:10], decode(model.decoder, encode(model.encoder, test[:10])),
                            ctx.run.figures / "ae_reconstructions.png")
    figures.loss_curves(history, ctx.run.figures / "ae_losses.png")
    return {"autoencoder": {
        "test_mse": test_mse, "test_bce": test_bce, "latent_dim": cfg.latent_dim,
        "train_images": len(train), "epochs": cfg.epochs, "train_seconds": round(train_seconds, 2),
        "history": {k: [round(v, 6) for v in vs] for k, vs in history.items()},
    }}
