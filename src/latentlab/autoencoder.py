"""Stage 1: train the convolutional autoencoder whose latent space every later stage works in."""
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from latentlab import figures
from latentlab.config import AutoencoderConfig
from latentlab.context import Context, set_threads, write_codes
from latentlab.errors import LatentlabError
from latentlab.models import Autoencoder, CodeStats, adam, batched, decode, device_of, inference_batch, stepper
from latentlab.runfolder import Run


def encode(encoder, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Images (N, 1, 28, 28) -> codes (N, latent_dim), on the encoder's device."""
    return batched(encoder.eval(), images, device_of(encoder), batch_size)


@torch.no_grad()
def mean_loss(model, images: torch.Tensor, batch_size: int | None = None) -> tuple[float, float]:
    """(BCE per pixel, MSE per pixel) of the reconstructions of `images`, on the model's device."""
    model.eval()
    device = device_of(model)
    batch_size = batch_size or inference_batch(device)
    bce = mse = torch.zeros((), device=device)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        logits = model.decoder.logits(model.encoder(x))
        bce = bce + F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        mse = mse + F.mse_loss(torch.sigmoid(logits), x, reduction="sum")
    n = images.numel()
    return bce.item() / n, mse.item() / n  # one host sync for the whole pass


def train_autoencoder(cfg: AutoencoderConfig, train: torch.Tensor, val: torch.Tensor, *, seed: int,
                      device=torch.device("cpu")) -> tuple[Autoencoder, dict]:
    """Adam on per-pixel binary cross-entropy; returns the model and its per-epoch losses.

    The images are moved to `device` once; the loss stays there and is read once an epoch.
    """
    torch.manual_seed(seed)
    model = Autoencoder(latent_dim=cfg.latent_dim, width=cfg.width).to(device)  # conv weights channels-last (models.py)
    train, val = train.to(device), val.to(device)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch < 1:
        raise LatentlabError(f"autoencoder: batch size {cfg.batch_size} is larger than the {len(train)} training images")
    on_cuda = device.type == "cuda"
    optimizer = adam(model.parameters(), lr=cfg.lr, capturable=on_cuda)
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros((), device=device)  # the epoch's summed loss, on the device, read once an epoch

    def train_step(batch: torch.Tensor) -> None:
        x = train[batch]                                            # (B, 1, 28, 28)
        loss = F.binary_cross_entropy_with_logits(model.decoder.logits(model.encoder(x)), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total.add_(loss.detach())

    # on CUDA each step is one CUDA graph replay after a few eager ones (training 8.1 -> 5.2-6.0 s on an H200)
    run_step = stepper(train_step, [optimizer], (torch.zeros(cfg.batch_size, dtype=torch.long, device=device),),
                       capture=on_cuda)
    history = {"train_bce": [], "val_bce": [], "val_mse": []}
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="autoencoder", unit="step", leave=False, mininterval=0.5)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        total.zero_()
        for step in range(steps_per_epoch):
            run_step(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            bar.update()
        val_bce, val_mse = mean_loss(model, val)
        history["train_bce"].append(total.item() / steps_per_epoch)
        history["val_bce"].append(val_bce)
        history["val_mse"].append(val_mse)
        bar.set_postfix(epoch=epoch + 1, val_mse=f"{val_mse:.4f}")
    bar.close()
    return model.eval(), history


def checkpoint(model: Autoencoder, cfg: AutoencoderConfig, stats: CodeStats) -> dict:
    """Weights, the arguments that rebuild the model, and the training codes' statistics (the generators' scale)."""
    return {"kind": "autoencoder", "model_args": {"latent_dim": cfg.latent_dim, "width": cfg.width},
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "code_mean": stats.mean.cpu(), "code_std": stats.std.cpu()}


def load_autoencoder(run: Run) -> Autoencoder:
    return run.load_model("autoencoder", Autoencoder, "train-ae")[0]


def stage(ctx: Context) -> dict:
    """Train the AE, save it with its code statistics, and report test MSE, per-epoch losses and a figure."""
    cfg = ctx.config.autoencoder
    set_threads(ctx.threads)
    train = ctx.images("train")
    if cfg.train_limit:
        train = train[:cfg.train_limit]
    start = time.perf_counter()
    model, history = train_autoencoder(cfg, train, ctx.images("val"), seed=ctx.config.seed, device=ctx.device)
    train_seconds = time.perf_counter() - start
    codes = {part: encode(model.encoder, ctx.images(part)) for part in ("train", "val", "test")}
    stats = CodeStats.of(codes["train"])  # every training code, whatever the limit
    ctx.run.save_checkpoint("autoencoder", checkpoint(model, cfg, stats))
    write_codes(ctx.run, codes)  # encoded once for every later stage and process
    ctx.autoencoder_changed()  # later stages load the saved ones
    test = ctx.images("test")
    test_bce, test_mse = mean_loss(model, test)
    figures.reconstructions(test[:10], decode(model.decoder, encode(model.encoder, test[:10])),
                            ctx.run.figures / "ae_reconstructions.png")
    figures.loss_curves(history, ctx.run.figures / "ae_losses.png")
    return {"autoencoder": {
        "test_mse": test_mse, "test_bce": test_bce, "latent_dim": cfg.latent_dim,
        "train_images": len(train), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "train_seconds": round(train_seconds, 2), "device": str(ctx.device),
        "history": {k: [round(v, 6) for v in vs] for k, vs in history.items()},
    }}
