"""Stages 4 and 5: GANs in the autoencoder's latent space, plain and conditioned on the digit.

The generator maps Gaussian noise (joined with the digit for the conditional GAN) to a standardised
latent code; the discriminator judges codes; the frozen AE decoder turns generated codes into images.
One training loop serves both GANs (labels=None means plain), read top to bottom like
pytorch/examples/dcgan. This module also holds what `latentlab sample` needs, and imports no
matplotlib at module level, so a cold `sample` stays fast.

The settings were chosen by measurement; every variant tried and its score is in docs/gan_sweep.md.
"""
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentlab.config import GANConfig
from latentlab.errors import LatentlabError
from latentlab.models import Autoencoder, Discriminator, Generator
from latentlab.runfolder import Run

NUM_CLASSES = 10
MAX_SAMPLES = 100_000
# A loss beyond this is divergence, not training: healthy losses of both kinds stay below about 10.
EXPLODED_LOSS = 100.0


@dataclass
class LatentGAN:
    """A trained generator and the code statistics that undo the standardisation it was trained in."""
    generator: Generator
    code_mean: torch.Tensor
    code_std: torch.Tensor
    noise_dim: int
    conditional: bool


class Diverged(LatentlabError):
    """Training stopped on a NaN, infinite or exploded loss; the message names the last good checkpoint."""

    def __init__(self, name: str, step: int, losses: tuple[float, float], last_saved: int | None, cfg: GANConfig):
        self.step, self.losses, self.last_saved = step, losses, last_saved
        kept = (f"kept the last good checkpoint, from step {last_saved}" if last_saved is not None
                else f"no checkpoint was saved (the first is due at step {cfg.checkpoint_every})")
        super().__init__(f"{name}: training diverged at step {step} (D loss {losses[0]:.3g}, G loss {losses[1]:.3g}); "
                         f"{kept}; try a smaller --set {name}.lr (now {cfg.lr:g})")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    # non-saturating GAN: binary cross-entropy, real = 1, generated = 0
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()  # -log D(G(z)): strong gradients while D still wins


def checkpoint(generator: Generator, cfg: GANConfig, code_mean, code_std, *, kind: str, step: int) -> dict:
    return {
        "kind": kind, "step": step, "steps": cfg.steps,
        "model_args": {"noise_dim": generator.noise_dim, "latent_dim": generator.latent_dim,
                       "hidden": cfg.hidden, "num_classes": generator.num_classes},
        "state_dict": {k: v.detach().clone() for k, v in generator.state_dict().items()},
        "code_mean": code_mean, "code_std": code_std,
    }


def train_gan(cfg: GANConfig, codes: torch.Tensor, labels: torch.Tensor | None = None, *, seed: int,
              save=None, name: str = "gan") -> tuple[Generator, dict]:
    """Train on standardised `codes` (N, latent_dim), with their digits if `labels` is given.

    Returns the generator to keep (the running average of G's weights when cfg.ema > 0) and a loss history.
    `save(generator, step)` is called every cfg.checkpoint_every steps. A NaN, infinite or exploded loss
    stops training with a `Diverged` error naming the last step saved.
    """
    import copy

    from tqdm import tqdm

    torch.manual_seed(seed)
    num_classes = NUM_CLASSES if labels is not None else 0
    netG = Generator(cfg.noise_dim, codes.shape[1], cfg.hidden, num_classes)
    netD = Discriminator(codes.shape[1], cfg.hidden, num_classes)
    optimizerG = torch.optim.Adam(netG.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    optimizerD = torch.optim.Adam(netD.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    # an exponential moving average of G's weights samples better than G's last step (Yazici et al. 2019);
    # a plain lerp per tensor (torch's AveragedModel walks the module tree each step: 8% of a step here)
    keep = copy.deepcopy(netG).requires_grad_(False) if cfg.ema > 0 else netG
    averaged = list(zip(keep.parameters(), netG.parameters())) if cfg.ema > 0 else []
    rng = torch.Generator().manual_seed(seed)
    history = {"step": [], "loss_d": [], "loss_g": [], "r1": []}
    sums, last_saved = np.zeros(3), None
    bar = tqdm(range(1, cfg.steps + 1), desc=name, unit="step", leave=False, mininterval=0.5)
    for step in bar:
        index = torch.randint(len(codes), (cfg.batch_size,), generator=rng)
        digits = labels[index] if labels is not None else None
        fake = netG(torch.randn(cfg.batch_size, cfg.noise_dim, generator=rng), digits)

        # (1) update D: push real codes up and generated codes down
        regularise = cfg.r1 > 0 and step % cfg.r1_every == 0
        real = codes[index].requires_grad_(regularise)
        real_logits = netD(real, digits)
        loss_d = discriminator_loss(real_logits, netD(fake.detach(), digits), cfg.loss)
        penalty = torch.zeros(())
        if regularise:  # R1 (Mescheder et al. 2018): keep D flat around real codes; lazily, so scaled up
            grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            penalty = cfg.r1 / 2 * cfg.r1_every * grad.pow(2).sum(1).mean()
        optimizerD.zero_grad(set_to_none=True)
        (loss_d + penalty).backward()
        optimizerD.step()

        # (2) update G: make D take the generated codes for real ones
        loss_g = generator_loss(netD(fake, digits), cfg.loss)
        optimizerG.zero_grad(set_to_none=True)
        loss_g.backward()
        optimizerG.step()
        with torch.no_grad():
            for average, current in averaged:
                average.lerp_(current, 1 - cfg.ema)

        values = (loss_d.item(), loss_g.item(), penalty.item())
        # divergence: a NaN/inf anywhere, or a loss far beyond what training ever shows (abs(nan) < x is False)
        if not (all(abs(v) < EXPLODED_LOSS for v in values[:2]) and math.isfinite(values[2])):
            bar.close()
            raise Diverged(name, step, values[:2], last_saved, cfg)
        sums += values
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = (step - 1) % cfg.log_every + 1
            for key, value in zip(("loss_d", "loss_g", "r1"), sums / n):
                history[key].append(round(float(value), 4))
            history["step"].append(step)
            sums[:] = 0
            bar.set_postfix(loss_d=history["loss_d"][-1], loss_g=history["loss_g"][-1], refresh=False)
        if save is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            if not all(torch.isfinite(p).all() for p in keep.parameters()):  # finite losses, broken weights
                bar.close()
                raise Diverged(name, step, values[:2], last_saved, cfg)
            save(keep, step)
            last_saved = step
    bar.close()
    return keep.eval(), history


def generate_codes(gan: LatentGAN, noise: torch.Tensor, labels: torch.Tensor | None = None,
                   batch_size: int = 10_000) -> torch.Tensor:
    """Noise (N, noise_dim) [and digits (N,)] -> un-standardised codes (N, latent_dim), ready to decode."""
    if gan.conditional and labels is None:
        raise LatentlabError("the conditional GAN needs a digit for every sample")
    out = []
    with torch.no_grad():
        for i in range(0, len(noise), batch_size):
            digits = labels[i:i + batch_size] if gan.conditional else None
            out.append(gan.generator(noise[i:i + batch_size], digits))
    return torch.cat(out) * gan.code_std + gan.code_mean


def sample_images(gan: LatentGAN, decoder, count: int, *, digit=None, seed: int = 0) -> np.ndarray:
    """`count` generated digits as uint8 (count, 28, 28), 255 = ink like MNIST; the same seed gives the same images.

    For the conditional GAN `digit` is one digit, an array of per-image digits, or None for 0-9 in turn.
    """
    noise = torch.randn(count, gan.noise_dim, generator=torch.Generator().manual_seed(seed))
    labels = None
    if gan.conditional:
        labels = torch.arange(count) % NUM_CLASSES if digit is None else torch.as_tensor(digit).long().expand(count)
    elif digit is not None:
        raise LatentlabError("the plain GAN cannot be asked for a digit; use the conditional GAN")
    codes = generate_codes(gan, noise, labels)
    images = []
    with torch.no_grad():
        for i in range(0, count, 5000):
            images.append(decoder(codes[i:i + 5000]))
    images = torch.cat(images).squeeze(1)
    return images.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def load_gan(run: Run, conditional: bool) -> LatentGAN:
    name = "cgan" if conditional else "gan"
    generator, ckpt = run.load_model(name, Generator, "train-cgan" if conditional else "train-gan")
    try:
        mean, std = ckpt["code_mean"].float(), ckpt["code_std"].float()
    except (KeyError, AttributeError) as e:
        raise LatentlabError(f"{run.checkpoints / (name + '.pt')}: not a usable {name} checkpoint "
                             f"(no code statistics: {str(e)[:80]})") from None
    return LatentGAN(generator, mean, std, generator.noise_dim, conditional)


def load_decoder(run: Run):
    """The AE's decoder alone (what sampling needs), without importing the training code and its figures."""
    return run.load_model("autoencoder", Autoencoder, "train-ae")[0].decoder


# ---------------------------------------------------------------------------------------------------------
# `latentlab sample`


def write_grid_png(images: np.ndarray, path: Path) -> None:
    """uint8 (N, 28, 28) -> one grayscale PNG, ceil(sqrt(N)) digits a row, 2 black pixels between them.

    Pillow (which matplotlib itself needs) writes it; matplotlib would add seconds to a cold `sample`.
    """
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    pad = 2
    grid = np.zeros((rows * (28 + pad) + pad, cols * (28 + pad) + pad), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (28 + pad):pad + r * (28 + pad) + 28, pad + c * (28 + pad):pad + c * (28 + pad) + 28] = image
    Image.fromarray(grid, mode="L").save(path, format="PNG")


MODELS = ("gan", "flow")


def write_samples(run_dir, count: int, out, *, digit: int | None = None, seed: int = 0, model: str = "gan") -> Path:
    """Generate `count` digits to a .png grid or a .npz: with model "gan" the plain GAN (digit None) or the
    conditional GAN; with model "flow" the latent flow, guided to `digit` or with no digit."""
    if model not in MODELS:
        raise LatentlabError(f"--model {model}: choose {' or '.join(MODELS)}")
    if not 1 <= count <= MAX_SAMPLES:
        raise LatentlabError(f"--count {count}: must be between 1 and {MAX_SAMPLES}")
    if digit is not None and not 0 <= digit <= 9:
        raise LatentlabError(f"--digit {digit}: must be a digit from 0 to 9")
    out = Path(out)
    try:  # checked before the models load, so a bad path fails at once
        is_folder, parent_is_folder = out.is_dir(), out.parent.is_dir()
    except OSError as e:  # e.g. a name too long for the file system
        raise LatentlabError(f"--out {out}: cannot write there ({e.strerror})") from None
    if is_folder:
        raise LatentlabError(f"--out {out}: is a folder; give a file name ending in .png or .npz")
    if out.suffix.lower() not in (".png", ".npz"):
        raise LatentlabError(f"--out {out}: must end in .png (a grid) or .npz (arrays)")
    if not parent_is_folder:
        raise LatentlabError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise LatentlabError(f"--out {out}: folder {out.parent} is not writable")
    run = Run(run_dir)
    if model == "flow":
        from latentlab import flow  # torch only, like this module

        images = flow.sample_images(flow.load_flow(run), load_decoder(run), count, digit=digit, seed=seed)
    else:
        gan = load_gan(run, conditional=digit is not None)
        images = sample_images(gan, load_decoder(run), count, digit=digit, seed=seed)
    try:
        if out.suffix.lower() == ".png":
            write_grid_png(images, out)
        else:
            labels = np.full(count, -1 if digit is None else digit, dtype=np.int64)
            with open(out, "wb") as f:  # a file object, so numpy does not append another .npz
                np.savez(f, images=images, labels=labels)
    except OSError as e:
        raise LatentlabError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# the pipeline stages


def _stage(ctx, conditional: bool) -> dict:
    from latentlab import figures
    from latentlab.context import set_threads

    name = "cgan" if conditional else "gan"
    cfg: GANConfig = getattr(ctx.config, name)
    codes = ctx.codes("train")
    code_mean, code_std = codes.mean(0), codes.std(0)
    standardised = (codes - code_mean) / code_std
    labels = torch.from_numpy(ctx.labels("train")) if conditional else None
    seed = ctx.config.seed * 1000 + (5 if conditional else 4)  # one sub-seed per stage

    def save(generator, step):
        ctx.run.save_checkpoint(name, checkpoint(generator, cfg, code_mean, code_std, kind=name, step=step))

    set_threads(1)  # small MLPs: one thread is fastest, and leaves the other core free
    start = time.perf_counter()
    try:
        generator, history = train_gan(cfg, standardised, labels, seed=seed, save=save, name=name)
    except Diverged as e:  # record it in metrics.json too, then stop the pipeline with the one-line message
        ctx.run.update_metrics({name: {"loss": cfg.loss, "steps": cfg.steps, "diverged": True, "diverged_at": e.step,
                                       "last_good_step": e.last_saved, "message": str(e)}})
        raise
    train_seconds = time.perf_counter() - start
    save(generator, cfg.steps)

    # fixed noise for the figures, so runs and settings can be compared by eye
    gan = LatentGAN(generator, code_mean, code_std, cfg.noise_dim, conditional)
    decoder = ctx.autoencoder.decoder
    if conditional:
        digits = np.repeat(np.arange(NUM_CLASSES), 10)  # row r = digit r
        images = sample_images(gan, decoder, 100, digit=digits, seed=ctx.config.seed)
        figures.grid_figure(images, ctx.run.figures / "cgan_samples.png", rows=10, cols=10,
                            title="conditional latent GAN: one row per digit", row_labels=range(10))
    else:
        images = sample_images(gan, decoder, 100, seed=ctx.config.seed)
        figures.grid_figure(images, ctx.run.figures / "gan_samples.png", rows=10, cols=10,
                            title="latent GAN: samples from fixed noise")
    figures.gan_losses(history, ctx.run.figures / f"{name}_losses.png", title=f"{name} training")
    return {name: {
        "loss": cfg.loss, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "r1": cfg.r1,
        "r1_every": cfg.r1_every, "ema": cfg.ema, "noise_dim": cfg.noise_dim, "hidden": cfg.hidden,
        "conditional": conditional, "discriminator": "projection" if conditional else "plain",
        "train_codes": len(codes), "diverged": False,
        "final_loss_d": history["loss_d"][-1], "final_loss_g": history["loss_g"][-1],
        "train_seconds": round(train_seconds, 2), "history": history,
    }}


def stage_gan(ctx) -> dict:
    """Train the plain latent GAN; save checkpoint "gan" and a sample grid from fixed noise."""
    return _stage(ctx, conditional=False)


def stage_cgan(ctx) -> dict:
    """Train the conditional latent GAN; save checkpoint "cgan" and a 10x10 grid, one row per digit."""
    return _stage(ctx, conditional=True)
