"""Stages 4 and 5: GANs in the autoencoder's latent space, plain and conditioned on the digit.

The generator maps Gaussian noise (joined with the digit for the conditional GAN) to a standardised
latent code; the discriminator judges codes; the frozen AE decoder turns generated codes into images.
One training loop serves both GANs (labels=None means plain), read top to bottom like
pytorch/examples/dcgan. This module also holds what `latentlab sample` needs, and imports no
matplotlib at module level, so a cold `sample` stays fast.

The settings were chosen by measurement; every variant tried and its score is in docs/gan_sweep.md.
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentlab import pixels
from latentlab.config import GANConfig
from latentlab.errors import LatentlabError
from latentlab.models import (Autoencoder, CodeStats, Discriminator, Generator, adam, capture_step, decode,
                              device_of, ema_decay)
from latentlab.runfolder import Run, atomic_write

NUM_CLASSES = 10
MAX_SAMPLES = 100_000
# A loss beyond this is divergence, not training: healthy losses of both kinds stay below about 10.
EXPLODED_LOSS = 100.0


@dataclass
class LatentGAN:
    """A trained generator and the code statistics that undo the standardisation it was trained in."""
    generator: Generator
    stats: CodeStats
    conditional: bool

    @property
    def noise_dim(self) -> int:
        return self.generator.noise_dim


class Diverged(LatentlabError):
    """Training stopped on a NaN, infinite or exploded loss; the message names the last good checkpoint."""

    def __init__(self, name: str, step: int, losses: tuple[float, float], last_saved: int | None, cfg: GANConfig):
        self.step, self.last_saved = step, last_saved
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


def checkpoint(generator: Generator, cfg: GANConfig, stats: CodeStats, *, kind: str, step: int) -> dict:
    return {
        "kind": kind, "step": step, "steps": cfg.steps,
        "model_args": {"noise_dim": generator.noise_dim, "latent_dim": generator.latent_dim,
                       "hidden": cfg.hidden, "num_classes": generator.num_classes},
        "state_dict": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
        "code_mean": stats.mean.cpu(), "code_std": stats.std.cpu(),
    }


def train_gan(cfg: GANConfig, codes: torch.Tensor, labels: torch.Tensor | None = None, *, seed: int,
              save=None, name: str = "gan") -> tuple[Generator, dict]:
    """Train on standardised `codes` (N, latent_dim), with their digits if `labels` is given, on codes' device.

    Returns the generator to keep (the running average of G's weights when cfg.ema > 0) and a loss history.
    `save(generator, step)` is called every cfg.checkpoint_every steps. A NaN, infinite or exploded loss
    stops training with a `Diverged` error naming the step and the last step saved.

    The host reads the device only once per window of log_every (or checkpoint_every) steps: losses, the
    divergence check and the first bad step are kept on the device. On CUDA each step is one CUDA graph
    replay (two graphs: with and without the R1 penalty), since launching a step's ~150 small kernels
    one by one costs far more than running them.
    """
    import copy

    from tqdm import tqdm

    device = codes.device
    torch.manual_seed(seed)
    num_classes = NUM_CLASSES if labels is not None else 0
    netG = Generator(cfg.noise_dim, codes.shape[1], cfg.hidden, num_classes).to(device)
    netD = Discriminator(codes.shape[1], cfg.hidden, num_classes).to(device)
    on_cuda = device.type == "cuda"
    optimizerG = adam(netG.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), capturable=on_cuda)
    optimizerD = adam(netD.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), capturable=on_cuda)
    # an exponential moving average of G's weights samples better than G's last step (Yazici et al. 2019)
    keep = copy.deepcopy(netG).requires_grad_(False) if cfg.ema > 0 else netG
    averaged, current = list(keep.parameters()), list(netG.parameters())
    rng = torch.Generator(device=device).manual_seed(seed)
    # on the device: the step count, summed losses (D, G, R1) since the last record, the first bad step
    step_count = torch.zeros((), dtype=torch.long, device=device)
    sums = torch.zeros(3, device=device)
    first_bad = torch.zeros((), dtype=torch.long, device=device)
    bad_losses = torch.zeros(2, device=device)

    def train_step(index: torch.Tensor, noise: torch.Tensor, regularise: bool) -> None:
        digits = labels[index] if labels is not None else None
        fake = netG(noise, digits)

        # (1) update D: push real codes up and generated codes down
        real = codes[index].requires_grad_(regularise)
        real_logits = netD(real, digits)
        loss_d = discriminator_loss(real_logits, netD(fake.detach(), digits), cfg.loss)
        penalty = torch.zeros((), device=device)
        if regularise:  # R1 (Mescheder et al. 2018): keep D flat around real codes; lazily, so scaled up
            grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            penalty = cfg.r1 / 2 * cfg.r1_every * grad.pow(2).sum(1).mean()
        optimizerD.zero_grad(set_to_none=True)
        (loss_d + penalty).backward()
        optimizerD.step()

        # (2) update G: make D take the generated codes for real ones (D's own gradients are not needed)
        netD.requires_grad_(False)
        loss_g = generator_loss(netD(fake, digits), cfg.loss)
        optimizerG.zero_grad(set_to_none=True)
        loss_g.backward()
        optimizerG.step()
        netD.requires_grad_(True)
        if cfg.ema > 0:
            with torch.no_grad():
                # with a warm-up: --quick's 1000 steps at 0.999 kept 37% of the random start (FD 498, recall 0)
                decay = ema_decay(step_count, cfg.ema)  # on the device: no host sync
                torch._foreach_lerp_(averaged, current, [1 - decay] * len(averaged))

        # bookkeeping, on the device: divergence is a NaN/inf anywhere or a loss far beyond what training shows
        with torch.no_grad():
            step_count.add_(1)
            losses = torch.stack([loss_d.detach(), loss_g.detach(), penalty.detach()])
            sums.add_(losses)
            bad = ~((losses[:2].abs() < EXPLODED_LOSS).all() & losses[2].isfinite())
            newly = bad & (first_bad == 0)
            first_bad.copy_(torch.where(newly, step_count, first_bad))
            bad_losses.copy_(torch.where(newly, losses[:2], bad_losses))

    static_index = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    static_noise = torch.zeros(cfg.batch_size, cfg.noise_dim, device=device)
    graphs, warmup = {}, 2 * cfg.r1_every if cfg.r1 > 0 else 3  # eager steps of both kinds before capture
    history = {"step": [], "loss_d": [], "loss_g": [], "r1": []}
    last_saved, since_record, step = None, 0, 0
    bar = tqdm(total=cfg.steps, desc=name, unit="step", leave=False, mininterval=0.5)
    while step < cfg.steps:
        # a window: up to the next record, checkpoint or the end; its random draws in one go
        end = min((step // cfg.log_every + 1) * cfg.log_every, (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every,
                  cfg.steps)
        indices = torch.randint(len(codes), (end - step, cfg.batch_size), generator=rng, device=device)
        noises = torch.randn(end - step, cfg.batch_size, cfg.noise_dim, generator=rng, device=device)
        for index, noise in zip(indices, noises):
            step += 1
            regularise = cfg.r1 > 0 and step % cfg.r1_every == 0
            if on_cuda and step > warmup and not graphs:
                graphs = capture_steps(train_step, static_index, static_noise, (False, True) if cfg.r1 > 0 else (False,),
                                       (optimizerD, optimizerG))
            if graphs:
                static_index.copy_(index)
                static_noise.copy_(noise)
                graphs[regularise].replay()
            else:
                train_step(index, noise, regularise)
        since_record += len(indices)
        bar.update(len(indices))

        # the window's one read of the device
        if int(first_bad):
            bar.close()
            raise Diverged(name, int(first_bad), tuple(bad_losses.tolist()), last_saved, cfg)
        if step % cfg.log_every == 0 or step == cfg.steps:
            for key, value in zip(("loss_d", "loss_g", "r1"), (sums / since_record).tolist()):
                history[key].append(round(value, 4))
            history["step"].append(step)
            sums.zero_()
            since_record = 0
            bar.set_postfix(loss_d=history["loss_d"][-1], loss_g=history["loss_g"][-1], refresh=False)
        if save is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            if not all(torch.isfinite(p).all() for p in keep.parameters()):  # finite losses, broken weights
                bar.close()
                raise Diverged(name, step, tuple((sums / max(since_record, 1))[:2].tolist()), last_saved, cfg)
            save(keep, step)
            last_saved = step
    bar.close()
    return keep.eval(), history


def capture_steps(train_step, static_index, static_noise, kinds, optimizers) -> dict:
    """One CUDA graph per kind of step (False: plain, True: with R1), each replaying a whole D+G update."""
    return {kind: capture_step(train_step, optimizers, static_index, static_noise, kind) for kind in kinds}


def generate_codes(gan: LatentGAN, noise: torch.Tensor, labels: torch.Tensor | None = None,
                   batch_size: int = 10_000) -> torch.Tensor:
    """Noise (N, noise_dim) [and digits (N,)] -> un-standardised codes (N, latent_dim) on the generator's device."""
    if gan.conditional and labels is None:
        raise LatentlabError("the conditional GAN needs a digit for every sample")
    device = device_of(gan.generator)
    with torch.no_grad():
        standard = torch.cat([gan.generator(noise[i:i + batch_size].to(device),
                                            labels[i:i + batch_size].to(device) if gan.conditional else None)
                              for i in range(0, len(noise), batch_size)])
    return gan.stats.restore(standard)


def sample_images(gan: LatentGAN, decoder, count: int, *, digit=None, seed: int = 0) -> np.ndarray:
    """`count` generated digits as uint8 (count, 28, 28), 255 = ink like MNIST; the same seed gives the same images
    on every device (the noise is drawn on the CPU).

    For the conditional GAN `digit` is one digit, an array of per-image digits, or None for 0-9 in turn.
    """
    noise = torch.randn(count, gan.noise_dim, generator=torch.Generator().manual_seed(seed))
    labels = None
    if gan.conditional:
        labels = torch.arange(count) % NUM_CLASSES if digit is None else torch.as_tensor(digit).long().expand(count)
    elif digit is not None:
        raise LatentlabError("the plain GAN cannot be asked for a digit; use the conditional GAN")
    codes = generate_codes(gan, noise, labels)
    return pixels.to_uint8(decode(decoder, codes))


def check_fits_autoencoder(run: Run, name: str, latent_dim: int, command: str) -> None:
    """Codes of one size go into a decoder of another: a generator trained on another run's autoencoder."""
    ae_path = run.checkpoints / "autoencoder.pt"
    if not ae_path.is_file():
        return
    from latentlab.checks import check_checkpoint

    ae = run.load_checkpoint("autoencoder")
    check_checkpoint(ae_path, ae, "autoencoder")
    latent = ae["model_args"].get("latent_dim")
    if latent is not None and latent != latent_dim:  # no latent_dim: the AE's own load says what is wrong
        raise LatentlabError(f"{run.checkpoints / (name + '.pt')}: makes codes of size {latent_dim}, but the run's "
                             f"autoencoder decodes codes of size {latent}; retrain it with "
                             f"`latentlab {command} --run {run.root}`")


def load_gan(run: Run, conditional: bool, device="cpu") -> LatentGAN:
    name = "cgan" if conditional else "gan"
    generator, ckpt = run.load_model(name, Generator, "train-cgan" if conditional else "train-gan")  # checked there
    check_fits_autoencoder(run, name, generator.latent_dim, "train-cgan" if conditional else "train-gan")
    stats = CodeStats(ckpt["code_mean"].float().to(device), ckpt["code_std"].float().to(device))
    return LatentGAN(generator.to(device), stats, conditional)


def load_decoder(run: Run):
    """The AE's decoder alone (what sampling needs), without importing the training code and its figures."""
    return run.load_model("autoencoder", Autoencoder, "train-ae")[0].decoder


# ---------------------------------------------------------------------------------------------------------
# `latentlab sample`


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
    from latentlab.checks import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise LatentlabError(f"--seed {seed}: must be a whole number 0-{MAX_SEED}")
    out = Path(out)
    try:  # checked before the models load, so a bad path fails at once
        is_folder, parent_is_folder = out.is_dir(), out.parent.is_dir()
        blocker = next((p for p in out.parents if p.exists()), None)  # the nearest part of the path that exists
    except OSError as e:  # e.g. a name too long for the file system
        raise LatentlabError(f"--out {out}: cannot write there ({e.strerror})") from None
    if blocker is not None and not blocker.is_dir():
        raise LatentlabError(f"--out {out}: {blocker} is a file, not a folder")
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
    try:  # through a temporary file: a failed write (a full disk, a kill) leaves an existing file as it was
        if out.suffix.lower() == ".png":
            atomic_write(out, lambda f: pixels.write_grid_png(images, f))
        else:
            labels = np.full(count, -1 if digit is None else digit, dtype=np.int64)
            # a file object, so numpy does not append another .npz
            atomic_write(out, lambda f: np.savez(f, images=images, labels=labels))
    except OSError as e:
        raise LatentlabError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# the pipeline stages


def _stage(ctx, conditional: bool) -> dict:
    from latentlab import figures
    from latentlab.context import set_threads, sub_seed

    name = "cgan" if conditional else "gan"
    cfg: GANConfig = getattr(ctx.config, name)
    codes, stats = ctx.standardised_codes("train"), ctx.code_stats
    labels = torch.from_numpy(ctx.labels("train")).to(ctx.device) if conditional else None

    def save(generator, step):
        ctx.run.save_checkpoint(name, checkpoint(generator, cfg, stats, kind=name, step=step))

    set_threads(1)  # small MLPs: one thread is fastest, and leaves the other core free
    start = time.perf_counter()
    try:
        generator, history = train_gan(cfg, codes, labels, seed=sub_seed(ctx.config.seed, name), save=save, name=name)
    except Diverged as e:  # recorded in metrics.json too; the pipeline stops with the one-line message
        e.sections = {name: {"loss": cfg.loss, "steps": cfg.steps, "diverged": True, "diverged_at": e.step,
                             "last_good_step": e.last_saved, "message": str(e)}}
        raise
    train_seconds = time.perf_counter() - start
    save(generator, cfg.steps)

    # fixed noise for the figures, so runs and settings can be compared by eye
    gan = LatentGAN(generator, stats, conditional)
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
        "loss": cfg.loss, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "beta1": cfg.beta1,
        "r1": cfg.r1, "r1_every": cfg.r1_every, "ema": cfg.ema, "noise_dim": cfg.noise_dim, "hidden": cfg.hidden,
        "conditional": conditional, "discriminator": "projection" if conditional else "plain",
        "train_codes": len(codes), "diverged": False, "device": str(ctx.device),
        "final_loss_d": history["loss_d"][-1], "final_loss_g": history["loss_g"][-1],
        "train_seconds": round(train_seconds, 2), "steps_per_second": round(cfg.steps / train_seconds, 1),
        "history": history,
    }}


def stage_gan(ctx) -> dict:
    """Train the plain latent GAN; save checkpoint "gan" and a sample grid from fixed noise."""
    return _stage(ctx, conditional=False)


def stage_cgan(ctx) -> dict:
    """Train the conditional latent GAN; save checkpoint "cgan" and a 10x10 grid, one row per digit."""
    return _stage(ctx, conditional=True)
