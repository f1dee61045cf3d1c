"""Stage 6: interpolation, shown and measured.

Four kinds of path, `steps` images each: between two plain-GAN samples by interpolating their noise
(linear and spherical), between two real test images by interpolating their AE codes (linear), and
between two samples of the flow with no digit by interpolating their noise (spherical): the flow's
noise-to-code map is a deterministic ODE, so its noise space can be walked like the GAN's.
The reference report showed one example and judged the GAN rows more digit-like along the way; here
the project's classifier scores the in-between images of many random pairs (its confidence along the
path, and the Frechet distance of those images to the test set), and the step lengths say how smooth
each path is.
"""
from typing import TYPE_CHECKING

import numpy as np
import torch

from latentlab.context import Context, set_threads, sub_seed
from latentlab.errors import LatentlabError

if TYPE_CHECKING:
    from latentlab.metrics import Reference

KINDS = ("linear_noise", "spherical_noise", "real_codes", "flow_noise")
LABELS = {"linear_noise": "GAN noise, linear", "spherical_noise": "GAN noise, spherical",
          "real_codes": "real test images, AE codes", "flow_noise": "flow noise, spherical"}
SHORT = {"linear_noise": "linear GAN-noise", "spherical_noise": "spherical GAN-noise", "real_codes": "real-code",
         "flow_noise": "flow-noise"}


def interpolate(a: torch.Tensor, b: torch.Tensor, steps: int, kind: str = "linear") -> torch.Tensor:
    """`steps` points from a to b (both included), (steps, D).

    "spherical" is slerp (Shoemake 1985; White 2016 for GAN noise): it follows the great circle, so
    the points keep the norm that Gaussian noise concentrates on, where a straight line cuts inside it.
    """
    t = torch.linspace(0, 1, steps, dtype=a.dtype)[:, None]
    if kind == "linear":
        return (1 - t) * a + t * b
    if kind != "spherical":
        raise ValueError(f"kind {kind!r}: choose linear or spherical")
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if torch.sin(omega) < 1e-6:  # (anti)parallel: the circle is not defined, the line is as good
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def step_lengths(points: np.ndarray) -> dict:
    """Smoothness of paths (pairs, steps, dims): each step's length relative to the endpoint distance.

    An even straight path has every step 1 / (steps - 1); a jump shows as a large maximum.
    """
    steps = np.linalg.norm(np.diff(points, axis=1), axis=2)                  # (pairs, steps - 1)
    ends = np.linalg.norm(points[:, -1] - points[:, 0], axis=1)[:, None]     # (pairs, 1)
    relative = steps / np.maximum(ends, 1e-12)
    return {"step_mean": float(relative.mean()), "step_max": float(relative.max(1).mean())}


def score_paths(images: torch.Tensor, classifier, test: "Reference", rng: np.random.Generator,
                resamples: int = 30) -> dict:
    """Digit-likeness and smoothness of paths of images (pairs, steps, 1, 28, 28).

    Only the in-between images count for digit-likeness (the endpoints are samples or reconstructions).
    Each number comes with its standard error over pairs (`*_se`; the Frechet distance's by a bootstrap
    over pairs), so the verdict can tell a difference from noise.
    """
    from latentlab.classifier import features_and_proba

    pairs, steps = images.shape[:2]
    flat = images.reshape(pairs * steps, 1, 28, 28)
    feats, proba = features_and_proba(classifier, flat)
    confidence = proba.max(1).reshape(pairs, steps)
    feats = feats.reshape(pairs, steps, -1)
    inner = slice(1, steps - 1)
    per_pair_mean, per_pair_min = confidence[:, inner].mean(1), confidence[:, inner].min(1)
    between = feats[:, inner]

    def fd(rows):
        return test.frechet_distance(between[torch.as_tensor(rows, device=between.device)].reshape(-1, feats.shape[2]))

    bootstrap = [fd(rng.integers(0, pairs, pairs)) for _ in range(resamples)]
    pixel = step_lengths(flat.reshape(pairs, steps, -1).double().cpu().numpy())
    feature = step_lengths(feats.double().cpu().numpy())
    return {
        "mean_confidence": float(per_pair_mean.mean()),
        "mean_confidence_se": float(per_pair_mean.std(ddof=1) / np.sqrt(pairs)),
        "min_confidence": float(per_pair_min.mean()),   # mean over pairs of each path's least confident image
        "min_confidence_se": float(per_pair_min.std(ddof=1) / np.sqrt(pairs)),
        "endpoint_confidence": float(confidence[:, [0, -1]].mean()),
        "frechet_distance": fd(np.arange(pairs)),
        "frechet_distance_se": float(np.std(bootstrap, ddof=1)),
        "pixel_step_mean": pixel["step_mean"], "pixel_step_max": pixel["step_max"],
        "feature_step_mean": feature["step_mean"], "feature_step_max": feature["step_max"],
    }


# the digit-likeness measures: (key, True when higher is better, words)
MEASURES = (("mean_confidence", True, "mean classifier confidence"),
            ("min_confidence", True, "the least confident image per path"),
            ("frechet_distance", False, "Frechet distance to the test set"))


def compare(gan: dict, real: dict) -> dict:
    """Per measure: +1 if the GAN path is better by more than twice the combined standard error, -1 if worse, 0 if not."""
    outcome = {}
    for key, higher_better, _ in MEASURES:
        diff = (gan[key] - real[key]) * (1 if higher_better else -1)
        noise = 2 * np.hypot(gan[f"{key}_se"], real[f"{key}_se"])
        outcome[key] = 0 if abs(diff) <= noise else int(np.sign(diff))
    return outcome


def verdict(results: dict, floor: float, steps: int, pairs: int) -> str:
    """The measured answer to the reference's claim that GAN rows are more digit-like along the way."""
    real = results["real_codes"]
    words = {1: "GAN better", -1: "real codes better", 0: "within noise"}
    parts, scores = [], {}
    for kind, name in (("linear_noise", "linear"), ("spherical_noise", "spherical")):
        outcome = compare(results[kind], real)
        scores[kind] = sum(outcome.values())
        detail = "; ".join(f"{text} {results[kind][key]:.{digits}f} vs {real[key]:.{digits}f} ({words[outcome[key]]})"
                           for (key, _, text), digits in zip(MEASURES, (3, 3, 1)))
        parts.append(f"GAN noise, {name}: {detail}")
    if all(v > 0 for v in scores.values()):
        answer = "GAN-noise paths are more digit-like along the way than real-code paths, as the reference judged"
    elif all(v < 0 for v in scores.values()):
        answer = "real-code paths are more digit-like along the way than GAN-noise paths, against the reference's judgement"
    elif any(v > 0 for v in scores.values()) and not any(v < 0 for v in scores.values()):
        answer = "only one GAN-noise interpolation is more digit-like than real-code paths; the reference's claim holds in part"
    else:
        answer = ("neither kind of path is clearly more digit-like along the way: the measures disagree or the "
                  "differences are within noise, so the reference's judgement is not borne out")
    smoothest = min((k for k in KINDS if k in results), key=lambda k: results[k]["feature_step_max"])
    flow = ""
    if "flow_noise" in results:  # the flow's paths, judged the same way against the real-code paths
        outcome = compare(results["flow_noise"], real)
        words = {1: "flow better", -1: "real codes better", 0: "within noise"}
        detail = "; ".join(f"{text} {results['flow_noise'][key]:.{digits}f} vs {real[key]:.{digits}f} "
                           f"({words[outcome[key]]})" for (key, _, text), digits in zip(MEASURES, (3, 3, 1)))
        total = sum(outcome.values())
        flow = (f". Flow noise, spherical (no digit): {detail}; so flow-noise paths are "
                + ("more digit-like than real-code paths" if total > 0 else
                   "less digit-like than real-code paths" if total < 0 else "about as digit-like as real-code paths")
                + f" (flow feature step max {results['flow_noise']['feature_step_max']:.3f})")
    return (
        f"Over {pairs} random pairs ({steps - 2} in-between images each), {answer}. "
        + ". ".join(parts) + flow
        + f" (differences count only beyond twice their standard error; real validation images of the same number "
        f"have Frechet distance {floor:.1f}). Smoothness: the largest step along a path, relative to the endpoint "
        f"distance in classifier features, is {results['linear_noise']['feature_step_max']:.3f} (linear noise), "
        f"{results['spherical_noise']['feature_step_max']:.3f} (spherical), {real['feature_step_max']:.3f} (real codes), "
        f"against {1 / (steps - 1):.3f} for an even pace: the {SHORT[smoothest]} paths change most evenly."
    )


def stage(ctx: Context) -> dict:
    """Interpolate `pairs` random pairs of each kind, score them, and draw one example row per kind."""
    from latentlab import figures
    from latentlab.autoencoder import decode
    from latentlab.classifier import features, load_classifier, reference_of_test_images
    from latentlab.flow import generate_codes as flow_codes
    from latentlab.flow import load_flow
    from latentlab.gan import generate_codes, load_gan

    cfg = ctx.config.interpolation
    set_threads(ctx.threads)
    gan = load_gan(ctx.run, conditional=False, device=ctx.device)
    decoder = ctx.autoencoder.decoder
    classifier = load_classifier(ctx.run).to(ctx.device)
    rng = torch.Generator().manual_seed(sub_seed(ctx.config.seed, "interpolation"))

    noise_a, noise_b = torch.randn(2, cfg.pairs, gan.noise_dim, generator=rng)
    test_codes = ctx.codes("test").cpu()  # the paths are made on the CPU, then decoded on the device
    if 2 * cfg.pairs > len(test_codes):
        raise LatentlabError(f"interpolation.pairs={cfg.pairs}: needs {2 * cfg.pairs} test images, there are {len(test_codes)}")
    ends = torch.randperm(len(test_codes), generator=rng)[:2 * cfg.pairs].view(2, cfg.pairs)  # distinct images
    flow = load_flow(ctx.run, device=ctx.device)
    flow_rng = torch.Generator().manual_seed(sub_seed(ctx.config.seed, "interpolation-flow"))  # the others stay
    flow_a, flow_b = torch.randn(2, cfg.pairs, flow.latent_dim, generator=flow_rng)

    def paths(a, b, kind):  # (pairs, D) x 2 -> (pairs * steps, D)
        return torch.cat([interpolate(a[i], b[i], cfg.steps, kind) for i in range(len(a))])

    codes = {
        "linear_noise": generate_codes(gan, paths(noise_a, noise_b, "linear")).cpu(),
        "spherical_noise": generate_codes(gan, paths(noise_a, noise_b, "spherical")).cpu(),
        "real_codes": paths(test_codes[ends[0]], test_codes[ends[1]], "linear"),
        "flow_noise": flow_codes(flow, paths(flow_a, flow_b, "spherical")).cpu(),  # no digit: any digit along the way
    }
    images = {k: decode(decoder, c).view(cfg.pairs, cfg.steps, 1, 28, 28) for k, c in codes.items()}

    test = reference_of_test_images(ctx, classifier)
    n_between = cfg.pairs * (cfg.steps - 2)
    val = ctx.images("val")
    floor_index = torch.randperm(len(val), generator=rng)[:n_between].to(ctx.device)
    floor = test.frechet_distance(features(classifier, val[floor_index]))
    bootstrap_rng = np.random.default_rng(sub_seed(ctx.config.seed, "interpolation-bootstrap"))
    results = {k: score_paths(images[k], classifier, test, bootstrap_rng) for k in KINDS}

    figures.grid_figure(torch.cat([images[k][0] for k in KINDS]).cpu(), ctx.run.figures / "interpolation.png",
                        rows=len(KINDS), cols=cfg.steps, row_labels=[LABELS[k] for k in KINDS],
                        title="interpolation: GAN noise (linear, spherical), real test images' codes, flow noise")
    return {"interpolation": {
        "pairs": cfg.pairs, "steps": cfg.steps, "in_between_images": n_between,
        **{k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()},
        "frechet_floor_same_count": round(floor, 4),
        "verdict": verdict(results, floor, cfg.steps, cfg.pairs),
    }}
