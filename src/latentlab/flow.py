"""The flow stage (after the GANs): a latent flow-matching generator beside them (Lipman et al. 2023).

A small MLP learns a velocity field v(x_t, t, digit) on the standardised AE codes. Training draws a code x1,
Gaussian noise x0 and a time t, takes the point on the straight path x_t = (1 - t) x0 + t x1 and regresses
v onto the path's velocity x1 - x0. The digit is replaced by a "no digit" class (index 10) at rate
`label_dropout`, so one network samples a chosen digit or any digit, and classifier-free guidance
(Ho & Salimans 2022) mixes the two: v = v(no digit) + guidance * (v(digit) - v(no digit)), rescaled towards the
digit's own speed (Lin et al. 2024), so that guidance turns the path rather than speeding along it.
Sampling integrates dx/dt = v from noise at t=0 to a code at t=1 with a fixed-step solver (Heun's last step is
Euler's, as in EDM's sampler); the map from noise to code is deterministic, so noise-space interpolation means
something here too. Asked for no digit, samples follow the digits' own fields weighted by a head of the network that
guesses the digit at x_t (digit_mixture_velocity): the marginal field, without the blur the "no digit" field learns.

This module also holds what `latentlab sample --model flow` needs and imports no matplotlib at module
level, so a cold `sample` stays fast. Every setting tried and its score is in docs/flow_sweep.md.
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentlab import pixels
from latentlab.config import FlowConfig
from latentlab.errors import LatentlabError
from latentlab.models import CodeStats, adam, decode, device_of, ema_decay, stepper
from latentlab.runfolder import Run

NUM_CLASSES = 10
NO_DIGIT = NUM_CLASSES      # the embedding index of "no digit" (dropped label, unconditional sampling)
SOLVERS = ("euler", "midpoint", "heun")


class VelocityField(nn.Module):
    """(x_t (B, D), t (B,), digit (B,) in 0..10) -> velocity (B, D): a residual MLP, conditioned in every block.

    The time and digit embeddings are summed into one condition c (as DiT does) and added to the input of each
    residual block; pre-norm blocks train faster here than a plain MLP on [x, t, digit] (docs/flow_sweep.md).
    """

    def __init__(self, *, latent_dim: int, hidden: int = 256, layers: int = 3, embed_dim: int = 64,
                 digit_head: bool = False):
        super().__init__()
        self.latent_dim, self.embed_dim = latent_dim, embed_dim
        self.input = nn.Linear(latent_dim, hidden)
        self.time = nn.Linear(embed_dim, hidden)    # one layer scores as well as two, 10% faster (docs/flow_sweep.md)
        self.digit = nn.Embedding(NUM_CLASSES + 1, hidden)    # index 10 = no digit
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(layers))
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, latent_dim))
        # the network's guess of the digit at x_t when it is not told it (p(digit | x_t, t), as logits): samples
        # with no digit follow the digits' own fields weighted by it (digit_mixture_velocity)
        self.digit_head = nn.Linear(hidden, NUM_CLASSES) if digit_head else None

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of t in [0, 1] (as in transformers and DiT), (B,) -> (B, embed_dim).

        Periods from 2 down to 0.02: fine enough to tell t apart near the data, none so fine they are noise.
        """
        half = self.embed_dim // 2
        freqs = math.pi * torch.exp(torch.linspace(0, math.log(100.0), half, device=t.device))
        angles = t[:, None] * freqs[None]                            # (B, half)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, digit: torch.Tensor, with_logits: bool = False):
        """The velocity (B, D); with_logits: also the digit head's logits (B, 10)."""
        c = self.time(self.time_features(t)) + self.digit(digit)     # (B, H) the condition
        h = self.input(x)                                            # (B, H)
        for block in self.blocks:
            h = h + block(h + c)
        features = self.output[0](h)                                 # (B, H) normed
        v = self.output[1](features)                                 # (B, D)
        return (v, self.digit_head(features)) if with_logits else v


@dataclass
class LatentFlow:
    """A trained velocity field, the code statistics that undo the standardisation, and how to sample it."""
    model: VelocityField
    stats: CodeStats
    guidance: float
    solver: str
    ode_steps: int
    guidance_rescale: float = 0.0   # 0 = plain classifier-free guidance (checkpoints from before the setting)
    guidance_reference: float = 0.0  # 0 = guidance against the "no digit" field (checkpoints from before the setting)
    no_digit_temperature: float = 1.0  # 1 = samples with no digit from the noise as drawn (likewise)

    @classmethod
    def from_config(cls, model: VelocityField, stats: CodeStats, cfg: FlowConfig) -> "LatentFlow":
        return cls(model, stats, cfg.guidance, cfg.solver, cfg.ode_steps, cfg.guidance_rescale,
                   cfg.guidance_reference, cfg.no_digit_temperature)

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim


# ---------------------------------------------------------------------------------------------------------
# training


def train_flow(cfg: FlowConfig, codes: torch.Tensor, labels: torch.Tensor, *, seed: int,
               device: torch.device = torch.device("cpu"), name: str = "flow") -> tuple[VelocityField, dict]:
    """Train on standardised `codes` (N, D) with their digits (N,); returns the field to keep and a loss history.

    The kept field is the exponential moving average of the weights when cfg.ema > 0. The step count, the
    learning rate and the summed loss live on the device, which is read once every cfg.log_every steps. On CUDA
    each step is one CUDA graph replay (eager, the step's ~150 small kernels took 4 ms on an H200).
    """
    import copy

    from tqdm import tqdm

    torch.manual_seed(seed)
    model = VelocityField(latent_dim=codes.shape[1], hidden=cfg.hidden, layers=cfg.layers, embed_dim=cfg.embed_dim,
                          digit_head=cfg.no_digit_sampling == "digit_mixture").to(device)
    on_cuda = device.type == "cuda"
    # the learning rate is a device tensor, so that a captured step reads the schedule's current value
    lr = torch.tensor(float(cfg.lr), device=device)
    optimizer = adam(model.parameters(), lr=lr, capturable=on_cuda)
    keep = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else model
    averages, currents = (list(keep.parameters()), list(model.parameters())) if cfg.ema > 0 else ([], [])
    codes, labels = codes.to(device), labels.to(device)
    # every random draw comes from one seeded generator on the device, so a seed repeats the run there
    rng = torch.Generator(device=device).manual_seed(seed)
    step_count = torch.zeros((), dtype=torch.long, device=device)   # steps taken
    running = torch.zeros(2, device=device)              # summed velocity and digit losses since the last record

    def train_step(index: torch.Tensor, drop: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> None:
        # cosine decay to zero: the last steps refine at a small step size
        lr.copy_(cfg.lr * 0.5 * (1 + torch.cos(step_count * (math.pi / cfg.steps))))
        x1, digit = codes[index], labels[index]                                         # (B, D), (B,)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1                                    # the straight path
        target = x1 - x0                                                                # its velocity
        if cfg.no_digit_target == "own_digit":
            # "no digit" rows regress onto the field's own velocity for their code's digit: the same minimiser (the
            # digits' fields weighted by how likely each is at x_t) without the spread between one digit's codes.
            # The field's guess is noise at first, so the path's velocity leads until halfway. The whole batch goes
            # through (fixed shapes for a CUDA graph): 17-30% more time a step on the CPU.
            with torch.no_grad():
                mix = (1 - 2 * step_count / cfg.steps).clamp(min=0)
                own = mix * target + (1 - mix) * model(xt, t, digit)
                target = torch.where(drop[:, None], own, target)
        shown = torch.where(drop, torch.full_like(digit, NO_DIGIT), digit)             # "no digit"
        if model.digit_head is None:
            loss = F.mse_loss(model(xt, t, shown), target)
            digit_loss = torch.zeros((), device=device)
        else:
            v, logits = model(xt, t, shown, with_logits=True)
            loss = F.mse_loss(v, target)
            # the head guesses the digit where the network is not told it: on the "no digit" rows
            guessed = F.cross_entropy(logits, digit, reduction="none")
            digit_loss = (guessed * drop).sum() / drop.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.digit_loss_weight * digit_loss).backward()
        optimizer.step()
        with torch.no_grad():
            step_count.add_(1)
            if averages:  # one call for every tensor, as the GANs do; the decay warms up (models.py)
                decay = ema_decay(step_count, cfg.ema)
                torch._foreach_lerp_(averages, currents, [1 - decay] * len(averages))
            running.add_(torch.stack([loss.detach(), digit_loss.detach()]))

    def draw() -> tuple[torch.Tensor, ...]:  # a step's codes, dropped digits, noise and times, in this order
        # step by step: drawing a window of steps in one go (other draws for the same seed) scored worse with no
        # digit, 33.2 against 31.1 mean Frechet distance over four seeds, each seed worse
        index = torch.randint(len(codes), (cfg.batch_size,), generator=rng, device=device)
        drop = torch.rand(cfg.batch_size, generator=rng, device=device) < cfg.label_dropout
        x0 = torch.randn(cfg.batch_size, codes.shape[1], generator=rng, device=device)
        if cfg.time_sampling == "logit_normal":  # more of the middle times, where the digit gets decided (SD3)
            return index, drop, x0, torch.sigmoid(torch.randn(cfg.batch_size, generator=rng, device=device))
        return index, drop, x0, torch.rand(cfg.batch_size, generator=rng, device=device)

    batch, width = cfg.batch_size, codes.shape[1]   # the buffers a captured step reads, refilled before each replay
    static = (torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.bool, device=device),
              torch.zeros(batch, width, device=device), torch.zeros(batch, device=device))
    run_step = stepper(train_step, [optimizer], static, capture=on_cuda)
    history = {"step": [], "loss": []}
    bar = tqdm(range(1, cfg.steps + 1), desc=name, unit="step", leave=False, mininterval=0.5)
    for step in bar:
        run_step(*draw())
        if step % cfg.log_every == 0 or step == cfg.steps:
            means = (running / ((step - 1) % cfg.log_every + 1)).tolist()   # one host sync per log_every steps
            mean = means[0]
            if not math.isfinite(mean):
                bar.close()
                raise LatentlabError(f"{name}: training diverged by step {step} (loss {mean:.3g}); "
                                     f"try a smaller --set {name}.lr (now {cfg.lr:g})")
            history["step"].append(step)
            history["loss"].append(round(mean, 5))
            if model.digit_head is not None:
                history.setdefault("digit_loss", []).append(round(means[1], 5))
            running.zero_()
            bar.set_postfix(loss=history["loss"][-1], refresh=False)
    bar.close()
    return keep.eval(), history


# ---------------------------------------------------------------------------------------------------------
# sampling: integrate dx/dt = v(x, t) from noise (t=0) to a code (t=1)


def velocity(model: VelocityField, x: torch.Tensor, t: float, digit: torch.Tensor | None, guidance: float,
             rescale: float = 0.0, reference: float = 0.0):
    """The guided velocity at time t. Guidance 0 is the "no digit" field; digit None is any digit: the digits' fields
    blended by the digit head's guess (digit_mixture_velocity) where the network has one, else the "no digit" field.

    `rescale` in [0, 1] moves the guided velocity towards the length of the digit's own (per sample): plain guidance
    also lengthens it, which overshoots and crowds the samples together (docs/flow_sweep.md). `reference` in [0, 1]:
    from MIXTURE_FROM on, guidance pushes away from (1 - reference) x the "no digit" field + reference x the blend of
    the digits' fields, where the network has a digit head; before it, and without a head, from the field."""
    times = torch.full((len(x),), t, device=x.device)
    if digit is None and model.digit_head is not None and t >= MIXTURE_FROM:
        return digit_mixture_velocity(model, x, times)
    no_digit = torch.full((len(x),), NO_DIGIT, dtype=torch.long, device=x.device)
    if digit is None or guidance == 0:
        return model(x, times, no_digit)
    if guidance == 1:
        return model(x, times, digit)
    if reference and model.digit_head is not None and t >= MIXTURE_FROM:
        # near a digit's own codes the blend is nearly that digit's field, so the push fades where the sample is
        # already right and stays where it heads for another digit: recall 0.694-0.696 -> 0.701-0.707 on three
        # flows, every digit at 98% or more (docs/flow_sweep.md)
        blend, field, v_digit = digit_mixture_velocity(model, x, times, with_field=True, asked=digit)
        v_none = torch.lerp(field, blend, reference)
    else:
        both = model(torch.cat([x, x]), torch.cat([times, times]), torch.cat([digit, no_digit]))  # one pass
        v_digit, v_none = both.chunk(2)
    guided = v_none + guidance * (v_digit - v_none)
    if rescale:
        ratio = v_digit.norm(dim=1, keepdim=True) / guided.norm(dim=1, keepdim=True).clamp_min(1e-12)
        guided = torch.lerp(guided, guided * ratio, rescale)
    return guided


# Samples with no digit asked for: before t = 0.3 every digit is still about equally likely, and the "no digit"
# field does as well as the blend there at a tenth of its cost; from 0.3 on the blend. Digits the guess gives under
# 5% are left out: on three default flows, Frechet distance 0.7-0.9 lower than with those under 1% left out, recall
# 0.001-0.002 lower, 10k samples in 6.4-6.9 s instead of 10-11.5 s on one thread (docs/flow_sweep.md).
MIXTURE_FROM = 0.3
MIXTURE_FLOOR = 0.05


def digit_mixture_velocity(model: VelocityField, x: torch.Tensor, times: torch.Tensor, with_field: bool = False,
                           asked: torch.Tensor | None = None):
    """The velocity with no digit asked for, as the digits' own fields weighted by how likely each digit is at x_t:
    v(x_t) = sum_d p(d | x_t) v(x_t, d), which is what the "no digit" field should learn (the flow-matching target
    averaged over the digits) without the network having to learn the blend. p(d | x_t) is the digit head's guess;
    digits it gives under MIXTURE_FLOOR are left out and the rest renormalised. with_field: also the "no digit"
    field, which the same pass gives. asked (N,): also each sample's field for that digit, (blend, field, v_asked),
    from the blend's pass: a guided sample's own digit is nearly always among its likely ones."""
    no_digit = torch.full((len(x),), NO_DIGIT, dtype=torch.long, device=x.device)
    field, logits = model(x, times, no_digit, with_logits=True)
    weights = logits.softmax(dim=1)                                                  # (N, 10)
    weights = torch.where(weights >= MIXTURE_FLOOR, weights, 0)
    weights = weights / weights.sum(dim=1, keepdim=True)    # the largest is >= 0.1, so never all dropped
    needed = weights > 0
    if asked is not None:
        every = torch.arange(len(x), device=x.device)
        needed[every, asked] = True                         # weight 0 where unlikely: it adds nothing to the blend
    rows, digits = needed.nonzero(as_tuple=True)            # one pass over every (sample, needed digit) pair
    v = model(x[rows], times[rows], digits)
    blend = torch.zeros_like(x).index_add_(0, rows, weights[rows, digits, None] * v)
    if asked is None:
        return (blend, field) if with_field else blend
    position = torch.zeros_like(weights, dtype=torch.long)
    position[rows, digits] = torch.arange(len(rows), device=x.device)
    return blend, field, v[position[every, asked]]


def rescaled(rescale: float) -> str:
    """" rescaled 1" after a guidance scale in titles, notes and the report; nothing where guidance is plain."""
    return f" rescaled {rescale:g}" if rescale else ""


@torch.no_grad()
def integrate(model: VelocityField, noise: torch.Tensor, digit: torch.Tensor | None = None, *,
              guidance: float = 1.0, rescale: float = 0.0, reference: float = 0.0, solver: str = "heun",
              steps: int = 8) -> torch.Tensor:
    """Noise (N, D) [and digits (N,)] -> standardised codes (N, D) after `steps` fixed steps of `solver`."""
    if solver not in SOLVERS:
        raise LatentlabError(f"solver {solver!r}: choose {', '.join(SOLVERS)}")
    x, dt = noise, 1.0 / steps
    for i in range(steps):
        t = i * dt
        v = velocity(model, x, t, digit, guidance, rescale, reference)
        if solver == "euler" or (solver == "heun" and i == steps - 1):
            # heun's last step is euler's, as in EDM's sampler: the field at t = 1, which heun would average in, is
            # the least trained (logit-normal training times rarely come near it). Four flows: Frechet distance
            # 0.12-0.27 lower, recall 0.012-0.016 higher, one pass fewer (docs/flow_sweep.md)
            x = x + dt * v
        elif solver == "midpoint":
            x = x + dt * velocity(model, x + dt / 2 * v, t + dt / 2, digit, guidance, rescale, reference)
        else:  # heun: average the slopes at both ends of the step
            x = x + dt / 2 * (v + velocity(model, x + dt * v, t + dt, digit, guidance, rescale, reference))
    return x


def generate_codes(flow: LatentFlow, noise: torch.Tensor, digits: torch.Tensor | None = None, *,
                   guidance: float | None = None, steps: int | None = None, batch_size: int = 10_000) -> torch.Tensor:
    """Noise (N, D) [and digits (N,)] -> un-standardised codes (N, D) on the flow's device, ready to decode.

    guidance and steps default to the checkpoint's settings (the ones the run was trained and scored with).
    """
    guidance = flow.guidance if guidance is None else guidance
    steps = flow.ode_steps if steps is None else steps
    if digits is None:  # the blend gathers samples near the digits' centres; a wider start spreads them as the codes
        noise = noise * flow.no_digit_temperature
    device = device_of(flow.model)
    out = []
    for i in range(0, len(noise), batch_size):
        digit = None if digits is None else digits[i:i + batch_size].to(device)
        out.append(integrate(flow.model, noise[i:i + batch_size].to(device), digit, guidance=guidance,
                             rescale=flow.guidance_rescale, reference=flow.guidance_reference, solver=flow.solver,
                             steps=steps))
    return flow.stats.restore(torch.cat(out))


def draw_noise(count: int, latent_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(seed))


def sample_images(flow: LatentFlow, decoder, count: int, *, digit=None, seed: int = 0, **sampling) -> np.ndarray:
    """`count` generated digits as uint8 (count, 28, 28), 255 = ink; the same seed gives the same images on every
    device (the noise is drawn on the CPU).

    `digit` is one digit, an array of per-image digits, or None for the unconditional flow (any digit).
    """
    digits = None if digit is None else torch.as_tensor(digit).long().expand(count)
    codes = generate_codes(flow, draw_noise(count, flow.latent_dim, seed), digits, **sampling)
    return pixels.to_uint8(decode(decoder, codes))


# ---------------------------------------------------------------------------------------------------------
# checkpoint


def checkpoint(model: VelocityField, cfg: FlowConfig, stats: CodeStats) -> dict:
    return {
        "kind": "flow", "steps": cfg.steps,
        "model_args": {"latent_dim": model.latent_dim, "hidden": cfg.hidden, "layers": cfg.layers,
                       "embed_dim": cfg.embed_dim, "digit_head": int(model.digit_head is not None)},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "code_mean": stats.mean.cpu(), "code_std": stats.std.cpu(),
        "sampling": {"guidance": cfg.guidance, "guidance_rescale": cfg.guidance_rescale,
                     "guidance_reference": cfg.guidance_reference, "no_digit_temperature": cfg.no_digit_temperature,
                     "solver": cfg.solver, "ode_steps": cfg.ode_steps},
    }


def load_flow(run: Run, device="cpu") -> LatentFlow:
    """The run's flow, checked (kind, weights, code statistics, sampling settings) and fitted to its autoencoder."""
    from latentlab.gan import check_fits_autoencoder

    # checked there: kind, arguments, weights, code statistics and sampling settings (checks.check_checkpoint)
    model, ckpt = run.load_model("flow", VelocityField, "train-flow")
    check_fits_autoencoder(run, "flow", model.latent_dim, "train-flow")
    stats = CodeStats(ckpt["code_mean"].float().to(device), ckpt["code_std"].float().to(device))
    sampling = ckpt["sampling"]
    return LatentFlow(model.to(device), stats, float(sampling["guidance"]), sampling["solver"],
                      sampling["ode_steps"], float(sampling.get("guidance_rescale", 0.0)),
                      float(sampling.get("guidance_reference", 0.0)), float(sampling.get("no_digit_temperature", 1.0)))


# ---------------------------------------------------------------------------------------------------------
# the pipeline stage


def stage(ctx) -> dict:
    """Train the flow on the standardised training codes; save checkpoint "flow" and a grid, one row per digit."""
    from latentlab import figures
    from latentlab.context import set_threads, sub_seed

    cfg: FlowConfig = ctx.config.flow
    codes, stats = ctx.standardised_codes("train"), ctx.code_stats   # the GANs' scale
    labels = torch.from_numpy(ctx.labels("train")).long().to(ctx.device)

    set_threads(1)  # a small MLP: one thread is fastest here, and leaves the other core free
    start = time.perf_counter()
    model, history = train_flow(cfg, codes, labels, seed=sub_seed(ctx.config.seed, "flow"), device=ctx.device)
    train_seconds = time.perf_counter() - start
    ctx.run.save_checkpoint("flow", checkpoint(model, cfg, stats))

    flow = LatentFlow.from_config(model, stats, cfg)
    start = time.perf_counter()
    digits = np.repeat(np.arange(NUM_CLASSES), 10)      # row r = digit r, from fixed noise
    images = sample_images(flow, ctx.autoencoder.decoder, 100, digit=digits, seed=ctx.config.seed)
    sample_seconds = time.perf_counter() - start
    figures.grid_figure(images, ctx.run.figures / "flow_samples.png", rows=10, cols=10, row_labels=range(10),
                        title=f"latent flow ({cfg.solver}, {cfg.ode_steps} steps, guidance {cfg.guidance:g}"
                              f"{rescaled(cfg.guidance_rescale)}): one row per digit")
    figures.loss_history(history, ctx.run.figures / "flow_losses.png", title="flow matching training")
    return {"flow": {
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "hidden": cfg.hidden, "layers": cfg.layers,
        "embed_dim": cfg.embed_dim, "label_dropout": cfg.label_dropout, "no_digit_target": cfg.no_digit_target,
        "no_digit_sampling": cfg.no_digit_sampling, "digit_loss_weight": cfg.digit_loss_weight,
        "time_sampling": cfg.time_sampling, "ema": cfg.ema, "guidance": cfg.guidance,
        "guidance_rescale": cfg.guidance_rescale, "guidance_reference": cfg.guidance_reference,
        "no_digit_temperature": cfg.no_digit_temperature, "solver": cfg.solver, "ode_steps": cfg.ode_steps,
        "parameters": sum(p.numel() for p in model.parameters()), "train_codes": len(codes),
        "device": str(ctx.device), "train_seconds": round(train_seconds, 2),
        "sample_100_seconds": round(sample_seconds, 3), "final_loss": history["loss"][-1], "history": history,
    }}


# ---------------------------------------------------------------------------------------------------------
# scored in the evaluation stage, beside the GANs (it holds the classifier and the test features)

SWEEP_STEPS = (1, 2, 4, 8, 16, 32)
SWEEP_GUIDANCE = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
TARGETS = {"accuracy": 0.99, "min_digit_accuracy": 0.98, "fd_over_exact_codes": 1.15, "recall": 0.7,
           "digit_share": (0.08, 0.12)}


def _seconds(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():  # the device works on after the call returns
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def evaluate_flow(ctx, classifier, real, floor: dict, baselines: dict, gans: dict, qualities: dict) -> dict:
    """flow.quality (digit asked for), flow.quality_unconditional (no digit), the ODE-steps and guidance sweep,
    sampling costs beside the GANs', the targets and a verdict. `gans` are the loaded GANs, `qualities` their scores.

    Both quality sections carry cgan.quality's keys; with no digit asked for, the accuracy keys are null.
    """
    from latentlab import figures
    from latentlab.context import sub_seed
    from latentlab.evaluate import conditional_quality, embed, unconditional_quality
    from latentlab.gan import generate_codes as gan_codes

    cfg, seed = ctx.config.evaluation, ctx.config.seed
    count = cfg.samples
    flow = load_flow(ctx.run, device=ctx.device)
    decoder = ctx.autoencoder.decoder

    def images(codes):
        return pixels.to_uint8(decode(decoder, codes))

    digits = np.arange(count) % 10
    digit_tensor = torch.from_numpy(digits).long()

    # quality: the same count, the same digits asked for, as the conditional GAN
    noise = draw_noise(count, flow.latent_dim, sub_seed(seed, "flow-sample"))
    codes, flow_seconds = _seconds(lambda: generate_codes(flow, noise, digit_tensor))
    quality = conditional_quality(classifier, real, images(codes), digits)
    noise = draw_noise(count, flow.latent_dim, sub_seed(seed, "flow-sample-no-digit"))
    codes, flow_none_seconds = _seconds(lambda: generate_codes(flow, noise))
    unconditional = {"accuracy": None, "accuracy_per_digit": None, "min_digit_accuracy": None,
                     **unconditional_quality(classifier, real, images(codes))}

    def gan_noise(gan):  # each GAN its own width of noise
        return torch.randn(count, gan.noise_dim, generator=torch.Generator().manual_seed(0))

    _, cgan_seconds = _seconds(lambda: gan_codes(gans["cgan"], gan_noise(gans["cgan"]), digit_tensor))
    _, gan_seconds = _seconds(lambda: gan_codes(gans["gan"], gan_noise(gans["gan"])))

    # the sweep: Frechet distance (and accuracy) of digit samples on a smaller sample, one setting varied at a time
    n = min(cfg.flow_sweep_samples, count)
    sweep_digits = digits[:n]
    sweep_noise = draw_noise(n, flow.latent_dim, sub_seed(seed, "flow-sweep"))

    scored = {}

    def score(steps=flow.ode_steps, guidance=flow.guidance):  # the run's own setting is in both sweeps: made once
        if (steps, guidance) not in scored:
            codes = generate_codes(flow, sweep_noise, digit_tensor[:n], steps=steps, guidance=guidance)
            feats, predicted = embed(classifier, images(codes))
            scored[steps, guidance] = {"frechet_distance": round(real.frechet_distance(feats), 4),
                                       "accuracy": round(float(np.mean(predicted == sweep_digits)), 4)}
        return dict(scored[steps, guidance])

    by_steps = {str(s): score(steps=s) for s in SWEEP_STEPS}
    by_guidance = {f"{g:g}": score(guidance=g) for g in SWEEP_GUIDANCE}
    exact = floor["train_reconstruction_frechet_distance"]
    rescale = rescaled(flow.guidance_rescale)
    note = (f"{n} digit samples per point ({flow.solver}; steps at guidance {flow.guidance:g}{rescale}, guidance"
            f"{rescale} at {flow.ode_steps} steps); the distance of a smaller sample runs higher")
    figures.flow_sweep({s: v["frechet_distance"] for s, v in by_steps.items()},
                       {g: v["frechet_distance"] for g, v in by_guidance.items()}, exact,
                       ctx.run.figures / "flow_sweep.png", note=note)

    costs = {"flow_10k_codes_seconds": round(flow_seconds * 10_000 / count, 3),
             "flow_no_digit_10k_codes_seconds": round(flow_none_seconds * 10_000 / count, 3),
             "cgan_10k_codes_seconds": round(cgan_seconds * 10_000 / count, 3),
             "gan_10k_codes_seconds": round(gan_seconds * 10_000 / count, 3)}
    low, high = TARGETS["digit_share"]
    targets = {
        "accuracy_at_least_0.99": quality["accuracy"] >= TARGETS["accuracy"],
        "min_digit_at_least_0.98": quality["min_digit_accuracy"] >= TARGETS["min_digit_accuracy"],
        "fd_within_1.15x_exact_codes": quality["frechet_distance"] <= TARGETS["fd_over_exact_codes"] * exact,
        "recall_at_least_0.7": quality["recall"] >= TARGETS["recall"],
        "no_digit_beats_gmm": unconditional["frechet_distance"] < baselines["gmm"]["frechet_distance"],
        "no_digit_recall_at_least_0.7": unconditional["recall"] >= TARGETS["recall"],
        "no_digit_shares_within_8_12_percent": all(low <= s <= high for s in unconditional["class_histogram"]),
    }
    metrics = ctx.run.metrics()
    train = {name: metrics.get(name, {}).get("train_seconds") for name in ("gan", "cgan", "flow")}
    return {
        "quality": quality, "quality_unconditional": unconditional,
        "sweep": {"samples": n, "solver": flow.solver, "guidance": flow.guidance,
                  "guidance_rescale": flow.guidance_rescale, "ode_steps": flow.ode_steps,
                  "by_ode_steps": by_steps, "by_guidance": by_guidance},
        "sampling_seconds": costs, "targets": targets,
        "verdict": verdict({**qualities, "flow": quality, "flow_no_digit": unconditional}, baselines, exact, costs,
                           train, f"{flow.ode_steps} {flow.solver} steps at guidance {flow.guidance:g}{rescale}"),
    }


def verdict(q: dict, baselines: dict, exact: float, costs: dict, train: dict, sampling: str) -> str:
    """Which generator is best on Frechet distance, by how much, and at what training and sampling cost."""
    def fd(x):
        return x["frechet_distance"]

    conditional = {"the flow with a digit": fd(q["flow"]), "the conditional GAN": fd(q["cgan"]),
                   "the per-digit Gaussian mixture": fd(baselines["gmm_per_digit"])}
    plain = {"the flow with no digit": fd(q["flow_no_digit"]), "the plain GAN": fd(q["gan"]),
             "the all-codes Gaussian mixture": fd(baselines["gmm"])}
    parts = []
    for group, scores in (("Asked for a digit", conditional), ("Asked for any digit", plain)):
        (best, best_fd), (second, second_fd) = sorted(scores.items(), key=lambda kv: kv[1])[:2]
        parts.append(f"{group}, {best} is best on Frechet distance ({best_fd:.2f}, {second_fd / best_fd:.2f}x lower "
                     f"than {second} at {second_fd:.2f}; exact codes score {exact:.2f})")

    def secs(x):
        return "n/a" if x is None else f"{x:.1f} s"

    parts[1] = parts[1][0].lower() + parts[1][1:]
    return ("; ".join(parts) + f". Conditional accuracy: flow {q['flow']['accuracy']:.4f}, conditional GAN "
            f"{q['cgan']['accuracy']:.4f}. Cost: training took {secs(train['flow'])} for the flow against "
            f"{secs(train['cgan'])} and {secs(train['gan'])} for the conditional and plain GAN; sampling ten "
            f"thousand codes takes {costs['flow_10k_codes_seconds']:.2f} s with the flow ({sampling}; with no digit "
            f"{costs['flow_no_digit_10k_codes_seconds']:.2f} s) against {costs['cgan_10k_codes_seconds']:.3f} s for "
            f"the conditional GAN (one pass). Training seconds are wall "
            f"time on this run's machine, each stage at its own moment: compare them only on a quiet machine.")
