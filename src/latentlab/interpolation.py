"""Stage 6: interpolation, shown and measured.

Three kinds of path, `steps` images each: between two plain-GAN samples by interpolating their noise
(linear and spherical), and between two real test images by interpolating their AE codes (linear).
The reference report showed one example and judged the GAN rows more digit-like along the way; here
the project's classifier scores the in-between images of many random pairs (its confidence along the
path, and the Frechet distance of those images to the test set), and the step lengths say how smooth
each path is.
"""
import numpy as np
import torch

from latentlab.context import Context, set_threads
from latentlab.errors import LatentlabError

KINDS = ("linear_noise", "spherical_noise", "real_codes")
LABELS = {"linear_noise": "GAN noise, linear", "spherical_noise": "GAN noise, spherical",
          "real_codes": "real test images, AE codes"}


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


def score_paths(images: torch.Tensor, classifier, test_features: np.ndarray) -> dict:
    """Digit-likeness and smoothness of paths of images (pairs, steps, 1, 28, 28)."""
    from latentlab.classifier import features, predict_proba
    from latentlab.metrics import frechet_distance

    pairs, steps = images.shape[:2]
    flat = images.reshape(pairs * steps, 1, 28, 28)
    confidence = predict_proba(classifier, flat).max(1).reshape(pairs, steps)
    feats = features(classifier, flat).reshape(pairs, steps, -1)
    inner = slice(1, steps - 1)  # the in-between images; the endpoints are samples or reconstructions
    pixel = step_lengths(flat.reshape(pairs, steps, -1).double().numpy())
    feature = step_lengths(feats)
    return {
        "mean_confidence": float(confidence[:, inner].mean()),
        "min_confidence": float(confidence[:, inner].min(1).mean()),   # mean over pairs of each path's lowest
        "endpoint_confidence": float(confidence[:, [0, -1]].mean()),
        "frechet_distance": frechet_distance(feats[:, inner].reshape(-1, feats.shape[2]), test_features),
        "pixel_step_mean": pixel["step_mean"], "pixel_step_max": pixel["step_max"],
        "feature_step_mean": feature["step_mean"], "feature_step_max": feature["step_max"],
    }


def verdict(results: dict, floor: float, steps: int) -> str:
    """One measured sentence: which kind of path is more digit-like along the way, and which is smoother."""
    lin, sph, real = (results[k] for k in KINDS)
    gan_conf = max(lin["mean_confidence"], sph["mean_confidence"])
    more = "GAN-noise" if gan_conf > real["mean_confidence"] else "real-code"
    less = "real-code" if more == "GAN-noise" else "GAN-noise"
    fd_agrees = (min(lin["frechet_distance"], sph["frechet_distance"]) < real["frechet_distance"]) == (more == "GAN-noise")
    smoother = min(KINDS, key=lambda k: results[k]["feature_step_max"])
    text = (
        f"{more} paths are more digit-like along the way than {less} paths: in-between images have mean "
        f"classifier confidence {lin['mean_confidence']:.3f} (GAN noise, linear) / {sph['mean_confidence']:.3f} "
        f"(spherical) vs {real['mean_confidence']:.3f} (real codes), the least confident image per path averages "
        f"{lin['min_confidence']:.3f} / {sph['min_confidence']:.3f} vs {real['min_confidence']:.3f}, and their "
        f"Frechet distance to the test set is {lin['frechet_distance']:.1f} / {sph['frechet_distance']:.1f} vs "
        f"{real['frechet_distance']:.1f} (real validation images of the same number: {floor:.1f})"
        + ("" if fd_agrees else ", which disagrees with the confidence") + ". "
        f"Smoothest in classifier features: {LABELS[smoother]} (largest step {results[smoother]['feature_step_max']:.3f} "
        f"of the endpoint distance; an even pace is {1 / (steps - 1):.3f}). "
        + ("This agrees with the reference report's judgement." if more == "GAN-noise"
           else "This contradicts the reference report, which judged the GAN rows more digit-like.")
    )
    return text


def stage(ctx: Context) -> dict:
    """Interpolate `pairs` random pairs of each kind, score them, and draw one example row per kind."""
    from latentlab import figures
    from latentlab.autoencoder import decode
    from latentlab.classifier import features, load_classifier
    from latentlab.gan import generate_codes, load_gan
    from latentlab.metrics import frechet_distance

    cfg = ctx.config.interpolation
    if cfg.steps < 3:
        raise LatentlabError(f"interpolation.steps={cfg.steps}: need at least 3 (two endpoints and one between)")
    set_threads(2)
    gan = load_gan(ctx.run, conditional=False)
    decoder = ctx.autoencoder.decoder
    classifier = load_classifier(ctx.run)
    rng = torch.Generator().manual_seed(ctx.config.seed * 1000 + 6)

    noise_a, noise_b = torch.randn(2, cfg.pairs, gan.noise_dim, generator=rng)
    test_codes = ctx.codes("test")
    if 2 * cfg.pairs > len(test_codes):
        raise LatentlabError(f"interpolation.pairs={cfg.pairs}: needs {2 * cfg.pairs} test images, there are {len(test_codes)}")
    ends = torch.randperm(len(test_codes), generator=rng)[:2 * cfg.pairs].view(2, cfg.pairs)  # distinct images

    def paths(a, b, kind):  # (pairs, D) x 2 -> (pairs * steps, D)
        return torch.cat([interpolate(a[i], b[i], cfg.steps, kind) for i in range(len(a))])

    codes = {
        "linear_noise": generate_codes(gan, paths(noise_a, noise_b, "linear")),
        "spherical_noise": generate_codes(gan, paths(noise_a, noise_b, "spherical")),
        "real_codes": paths(test_codes[ends[0]], test_codes[ends[1]], "linear"),
    }
    images = {k: decode(decoder, c).view(cfg.pairs, cfg.steps, 1, 28, 28) for k, c in codes.items()}

    test_features = features(classifier, ctx.images("test"))
    n_between = cfg.pairs * (cfg.steps - 2)
    val = ctx.images("val")
    floor_index = torch.randperm(len(val), generator=rng)[:n_between]
    floor = frechet_distance(features(classifier, val[floor_index]), test_features)
    results = {k: score_paths(images[k], classifier, test_features) for k in KINDS}

    figures.grid_figure(torch.cat([images[k][0] for k in KINDS]), ctx.run.figures / "interpolation.png",
                        rows=len(KINDS), cols=cfg.steps, row_labels=[LABELS[k] for k in KINDS],
                        title="interpolation: GAN noise (linear, spherical) and real test images' codes")
    return {"interpolation": {
        "pairs": cfg.pairs, "steps": cfg.steps, "in_between_images": n_between,
        **{k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()},
        "frechet_floor_same_count": round(floor, 4),
        "verdict": verdict(results, floor, cfg.steps),
    }}
