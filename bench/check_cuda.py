"""The device-only paths against their twins, on small synthetic data (needs a GPU; about a minute):

- the GANs' device-graph steps against the same steps launched one by one (same seed: the same weights);
- Poisson learning's stacked solve on the GPU against the CPU's;
- the Gaussian mixture fitted on the GPU (scikit-learn's array-API dispatch) against the CPU's fit;
- the few-label MLPs stacked by vmap against the loop over copies.

    python bench/check_cuda.py

Each check prints one line; the script exits non-zero if any check failed or crashed.
"""
import os
import sys
import time
import traceback

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # before scipy's first import, as `latentlab run --device cuda` does

import numpy as np
import torch

import latentlab.gan as gan
import latentlab.models as models
from latentlab.config import GANConfig

CHECKS = []


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def run_checks(device) -> list[str]:
    """Run every check; each prints one line. Returns the names of those that failed or crashed."""
    failures = []
    for name, fn in CHECKS:
        start = time.perf_counter()
        try:
            ok, line = fn(device)
        except Exception:
            ok, line = False, "crashed:\n" + traceback.format_exc()
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({time.perf_counter() - start:.1f} s): {line}", flush=True)
        if not ok:
            failures.append(name)
    return failures


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def mixture_codes(n: int, dim: int = 16, seed: int = 0, spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=g)
    centres = torch.randn(10, dim, generator=g) * 2
    return centres[labels] + torch.randn(n, dim, generator=g) * spread, labels


def trained(train, device, eager: bool, module=models, name="capture_step", never=lambda *args: None):
    """(weights, history, seconds) of `train()`; with `eager`, `module.name` is replaced so nothing is captured
    and every step is launched kernel by kernel."""
    original = getattr(module, name)
    if eager:
        setattr(module, name, never)
    try:
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        model, history = train()
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds = time.perf_counter() - start
    finally:
        setattr(module, name, original)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), history, seconds


def same_training(captured, eager, loss: str, steps: int) -> tuple[bool, str]:
    gap = relative(captured[0], eager[0])
    losses = captured[1][loss][-1], eager[1][loss][-1]
    return gap < 1e-3 and np.isfinite(losses).all(), (
        f"weights differ by {gap:.2e} (relative); last {loss} {losses[0]:.4f} vs {losses[1]:.4f}; "
        f"{steps / captured[2]:,.0f} vs {steps / eager[2]:,.0f} steps/s")


@check("GAN: CUDA-graph steps = eager steps")
def gan_graphs(device):
    codes, labels = mixture_codes(5000)
    codes, labels = codes.to(device), labels.to(device)
    cfg = GANConfig(steps=1000, checkpoint_every=10_000, log_every=500)
    runs = [trained(lambda: gan.train_gan(cfg, codes, labels, seed=3), device, eager, gan, "capture_steps",
                    lambda *args: {}) for eager in (False, True)]
    return same_training(*runs, "loss_d", cfg.steps)


@check("flow: CUDA-graph steps = eager steps")
def flow_graphs(device):
    import latentlab.flow as flow
    from latentlab.config import FlowConfig

    codes, labels = mixture_codes(5000)
    results = []
    for target in ("path", "own_digit"):  # own_digit: a second forward pass inside the captured step
        cfg = FlowConfig(steps=600, log_every=200, no_digit_target=target)
        runs = [trained(lambda: flow.train_flow(cfg, codes, labels, seed=3, device=device), device, eager)
                for eager in (False, True)]
        results.append(same_training(*runs, "loss", cfg.steps))
    return all(ok for ok, _ in results), "; ".join(f"{t}: {text}" for t, (_, text) in zip(("path", "own_digit"),
                                                                                          results))


@check("autoencoder and classifier: CUDA-graph steps = eager steps, within eager runs' own spread")
def conv_graphs(device):
    """cuDNN's convolutions are not bit-reproducible (their backward sums in no fixed order), so the graph's
    weights are compared with two eager runs' difference, not with zero."""
    import latentlab.autoencoder as autoencoder
    import latentlab.classifier as classifier
    from latentlab.config import AutoencoderConfig, ClassifierConfig

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(3000, 1, 28, 28, generator=g), torch.randint(10, (3000,), generator=g).numpy()
    lines, ok = [], True
    for module, train in (
            (autoencoder, lambda: autoencoder.train_autoencoder(AutoencoderConfig(epochs=2), images[:2500], images[2500:],
                                                                seed=0, device=device)),
            (classifier, lambda: classifier.train_classifier(ClassifierConfig(epochs=2), images[:2500], labels[:2500],
                                                             images[2500:], labels[2500:], seed=0, device=device))):
        weights = {mode: trained(train, device, mode != "graphs")[0] for mode in ("graphs", "eager", "eager again")}
        gap, spread = relative(weights["graphs"], weights["eager"]), relative(weights["eager again"], weights["eager"])
        ok = ok and gap <= max(10 * spread, 1e-6)
        lines.append(f"{module.__name__.split('.')[-1]}: graph vs eager {gap:.2e}, eager vs eager {spread:.2e}")
    return ok, "; ".join(lines)


@check("Poisson: stacked solve on CUDA = on the CPU")
def poisson(device):
    from latentlab.fewshot import code_graph, poisson_sources, poisson_solve

    codes, labels = mixture_codes(4000, spread=1.5)  # overlapping: one connected graph, as the real codes give
    weights, _ = code_graph(codes, 10)
    rng = np.random.default_rng(0)
    draws = [rng.choice(4000, 20, replace=False) for _ in range(3)]
    columns = [np.unique(labels.numpy()[d], return_inverse=True) for d in draws]
    sources, groups = poisson_sources(4000, draws, columns)
    on_cpu = poisson_solve(weights, sources, groups)
    on_gpu = poisson_solve(weights, sources.to(device), groups.to(device)).cpu()
    width = [len(c) for c, _ in columns]
    agree = np.mean([float((a.argmax(1) == b.argmax(1)).double().mean())
                     for a, b in zip(on_cpu.split(width, 1), on_gpu.split(width, 1))])
    finite = on_cpu.isfinite().all(1)  # a code whose edges all vanish has degree 0: NaN on both devices
    gap = relative(on_gpu[finite], on_cpu[finite])
    same_nan = bool((on_gpu.isfinite().all(1) == finite).all())
    return gap < 1e-3 and agree > 0.999 and same_nan, (f"relative gap {gap:.2e} over {int(finite.sum())} of 4000 codes "
                                                       f"(the same NaN rows: {same_nan}), argmax agree {agree:.5f}")


@check("GMM: fitted on CUDA by array-API dispatch, log-likelihood near the CPU fit's")
def gmm(device):
    from latentlab.evaluate import fit_gmm

    codes, _ = mixture_codes(6000)
    train, val = codes[:5000], codes[5000:]
    _, on_gpu = fit_gmm(train.to(device), val.to(device), 10, seed=0)
    _, on_cpu = fit_gmm(train, val, 10, seed=0)
    line = (f"fitted on {on_gpu['fitted_on']} {on_gpu.get('cuda_fallback', '')}: val log-likelihood "
            f"{on_gpu['val_log_likelihood']:.3f} vs CPU {on_cpu['val_log_likelihood']:.3f}")
    return on_gpu["fitted_on"].startswith("cuda") and on_gpu["val_log_likelihood"] > on_cpu["val_log_likelihood"] - 0.5, line


@check("few-label MLPs: vmap-stacked copies = the loop over copies, on CUDA")
def stacked(device):
    from latentlab.fewshot import Stacked, make_head

    torch.manual_seed(0)
    models = [make_head(((128, "sigmoid"), (512, "sigmoid")), 16).to(device) for _ in range(4)]
    codes, labels = mixture_codes(4 * 50 + 1000)
    inputs, targets = codes[:200].reshape(4, 50, 16).to(device), labels[:200].reshape(4, 50).to(device)
    predictions = []
    for vmapped in (True, False):
        stack = Stacked(models, vmapped=vmapped)
        for _ in range(100):
            stack.step(inputs, targets)
        predictions.append(stack.predict(codes[200:].to(device)))
    agree = float((predictions[0] == predictions[1]).mean())
    return agree > 0.99, f"after 100 steps, the two paths' predictions agree on {agree:.4f} of 4 x 1000 codes"


if __name__ == "__main__":
    # --cpu: the same checks on the CPU (the twins then run on one device: a check of this script itself)
    on = torch.device("cpu" if "--cpu" in sys.argv else "cuda")
    if on.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks need a GPU (--cpu runs them on the CPU)")
    print(torch.__version__, torch.cuda.get_device_name() if on.type == "cuda" else "CPU", flush=True)
    sys.exit(1 if run_checks(on) else 0)
