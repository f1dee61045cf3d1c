"""Stage 7: how good are the generated digits, measured by the project's own classifier.

Every generator (the two GANs and their Gaussian-mixture baselines) is scored the same way on `samples`
images against the 10k test images: Frechet distance and k-NN precision/recall in the classifier's
penultimate features, the share classified as the digit asked for (conditional models), and the class
histogram (plain models; mode collapse shows there). Floors put the distances in scale: real training
images (what a perfect generator would score) and the AE's reconstructions (about the best a generator
decoding through this AE can hope for). The Gaussian mixtures are the baseline the latent-GAN literature
found hard to beat; the verdict says plainly whether the GANs beat them.
"""
import time
import zlib

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

from latentlab import figures
from latentlab.autoencoder import decode
from latentlab.classifier import features_and_proba, load_classifier
from latentlab.context import Context, set_threads
from latentlab.metrics import frechet_distance, one_blas_thread, precision_recall

TARGETS = {"cgan_accuracy": 0.99, "cgan_min_digit_accuracy": 0.97, "fd_over_reconstruction_floor": 1.5, "recall": 0.5}


def sub_seed(seed: int, name: str) -> int:
    """A fixed seed per purpose, derived from the run's seed (so adding a purpose changes no other)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output (N, 1, 28, 28) in [0, 1] -> uint8 (N, 28, 28), the same rounding as gan.sample_images."""
    return images.squeeze(1).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def embed(classifier, images) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F), predicted digit (N,)) in one pass: the head applied to the features gives the logits."""
    feats, proba = features_and_proba(classifier, images)
    return feats, proba.argmax(axis=1)


def distances(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    return {"frechet_distance": frechet_distance(fake, real), **precision_recall(real, fake, k=k)}


def class_histogram(predicted: np.ndarray) -> list[float]:
    return (np.bincount(predicted, minlength=10) / len(predicted)).tolist()


def unconditional_quality(classifier, real: np.ndarray, images, k: int) -> dict:
    feats, predicted = embed(classifier, images)
    return {**distances(real, feats, k), "class_histogram": class_histogram(predicted), "samples": len(images)}


def conditional_quality(classifier, real: np.ndarray, images, digits: np.ndarray, k: int) -> dict:
    feats, predicted = embed(classifier, images)
    per_digit = {str(d): float(np.mean(predicted[digits == d] == d)) for d in range(10)}
    return {"accuracy": float(np.mean(predicted == digits)), "accuracy_per_digit": per_digit,
            "min_digit_accuracy": min(per_digit.values()), **distances(real, feats, k),
            "class_histogram": class_histogram(predicted), "samples": len(images)}


def fit_gmm(train: np.ndarray, val: np.ndarray, components: int, seed: int) -> tuple[GaussianMixture, dict]:
    """A full-covariance mixture on `train`, scored by its mean log-likelihood per code on `val`."""
    with one_blas_thread():
        gmm = GaussianMixture(components, covariance_type="full", max_iter=200, random_state=seed).fit(train)
        score = float(gmm.score(val))
    return gmm, {"components": components, "covariance_type": "full", "fitted_codes": len(train),
                 "val_log_likelihood": score}


def sample_gmm(gmm: GaussianMixture, count: int, decoder, seed: int) -> np.ndarray:
    """`count` decoded images (uint8) from a fitted mixture, in random order (sklearn groups them by component)."""
    gmm.random_state = seed
    codes, _ = gmm.sample(count)
    codes = codes[np.random.default_rng(seed).permutation(count)]
    return to_uint8(decode(decoder, torch.from_numpy(codes).float()))


def gmm_baselines(ctx: Context, classifier, real: np.ndarray, count: int, k: int) -> tuple[dict, dict]:
    """The baseline the latent-GAN literature found hard to beat: Gaussian mixtures on the AE codes.

    Returns the `baselines` section and the sample images (for the figures).
    """
    cfg, seed, decoder = ctx.config.evaluation, ctx.config.seed, ctx.autoencoder.decoder
    train, val = ctx.codes("train").double().numpy(), ctx.codes("val").double().numpy()
    train_labels, val_labels = ctx.labels("train"), ctx.labels("val")

    # a seeded subset keeps the one large fit within budget (80 components on 20k codes fit the validation
    # codes better than 40 on all 55k, in a quarter of the time)
    subset = np.random.default_rng(sub_seed(seed, "gmm-subset")).permutation(len(train))[:cfg.gmm_fit_limit]
    gmm, choice = fit_gmm(train[np.sort(subset)], val, cfg.gmm_components, sub_seed(seed, "gmm"))
    plain_images = sample_gmm(gmm, count, decoder, sub_seed(seed, "gmm-sample"))
    plain = {**choice, **unconditional_quality(classifier, real, plain_images, k)}

    # one mixture per digit, asked for each digit equally often (like the conditional GAN)
    digits = np.arange(count) % 10
    per_digit_images = np.zeros((count, 28, 28), dtype=np.uint8)
    choices = []
    for d in tqdm(range(10), desc="per-digit mixtures", leave=False):
        gmm_d, choice_d = fit_gmm(train[train_labels == d], val[val_labels == d],
                                  cfg.gmm_components_per_digit, sub_seed(seed, f"gmm-digit-{d}"))
        per_digit_images[digits == d] = sample_gmm(gmm_d, int(np.sum(digits == d)), decoder,
                                                   sub_seed(seed, f"gmm-digit-{d}-sample"))
        choices.append(choice_d)
    per_digit = {
        "components": [c["components"] for c in choices], "covariance_type": choices[0]["covariance_type"],
        "val_log_likelihood": [c["val_log_likelihood"] for c in choices],
        **conditional_quality(classifier, real, per_digit_images, digits, k),
    }
    return {"gmm": plain, "gmm_per_digit": per_digit}, {"gmm": plain_images, "gmm_per_digit": per_digit_images}


def floors(ctx: Context, classifier, real: np.ndarray, count: int, k: int) -> dict:
    """What real images score (train vs test) and what the AE allows (its reconstructions).

    All use `count` images, like the generators: the Frechet distance of a finite sample is biased upwards by
    an amount that depends on the sample size. Reconstructions of the test images themselves sit next to
    their own originals, which flatters their precision/recall; reconstructions of training images are the
    fair level for a generator that decodes through this AE, so both are reported.
    """
    rng = np.random.default_rng(sub_seed(ctx.config.seed, "floors"))
    decoder = ctx.autoencoder.decoder
    train_chosen = rng.choice(len(ctx.codes("train")), count, replace=False)
    train = distances(real, embed(classifier, ctx.images("train")[train_chosen])[0], k)
    train_recon_images = to_uint8(decode(decoder, ctx.codes("train")[train_chosen]))
    train_recon = distances(real, embed(classifier, train_recon_images)[0], k)
    test_chosen = rng.choice(len(real), count, replace=False)
    recon_images = to_uint8(decode(decoder, ctx.codes("test")[test_chosen]))
    recon = conditional_quality(classifier, real, recon_images, ctx.labels("test")[test_chosen], k)
    return {
        "train_vs_test_frechet_distance": train["frechet_distance"],
        "train_vs_test_precision": train["precision"], "train_vs_test_recall": train["recall"],
        "reconstruction_frechet_distance": recon["frechet_distance"],
        "reconstruction_precision": recon["precision"], "reconstruction_recall": recon["recall"],
        "reconstruction_accuracy": recon["accuracy"],
        "train_reconstruction_frechet_distance": train_recon["frechet_distance"],
        "train_reconstruction_precision": train_recon["precision"],
        "train_reconstruction_recall": train_recon["recall"],
    }


def verdict(gan: dict, cgan: dict, baselines: dict, floor: dict) -> str:
    """One paragraph in plain words: who wins on Frechet distance, with the numbers."""
    gan_fd, cgan_fd = gan["frechet_distance"], cgan["frechet_distance"]
    gmm_fd, gmm_digit_fd = baselines["gmm"]["frechet_distance"], baselines["gmm_per_digit"]["frechet_distance"]
    gan_wins, cgan_wins = gan_fd < gmm_fd, cgan_fd < gmm_digit_fd
    limit = TARGETS["fd_over_reconstruction_floor"] * floor["reconstruction_frechet_distance"]
    exact = floor["train_reconstruction_frechet_distance"]
    if gan_wins and cgan_wins:
        summary = "Both GANs beat their Gaussian-mixture baselines"
    elif not gan_wins and not cgan_wins:
        summary = "The GANs do not beat the Gaussian mixture"
    elif gan_wins:
        summary = "Only the plain GAN beats its Gaussian-mixture baseline; the conditional GAN does not"
    else:
        summary = "Only the conditional GAN beats its Gaussian-mixture baseline; the plain GAN does not"
    return (f"{summary} on Frechet distance in the classifier's features (lower is better): plain GAN "
            f"{gan_fd:.2f} vs one Gaussian mixture on all codes {gmm_fd:.2f}; conditional GAN {cgan_fd:.2f} vs "
            f"one Gaussian mixture per digit {gmm_digit_fd:.2f}. Floors: real training images "
            f"{floor['train_vs_test_frechet_distance']:.2f}, the AE's reconstructions "
            f"{floor['reconstruction_frechet_distance']:.2f}. Conditional accuracy: GAN {cgan['accuracy']:.4f} "
            f"vs per-digit mixture {baselines['gmm_per_digit']['accuracy']:.4f}. The distance target for the "
            f"conditional GAN is {limit:.2f} ({TARGETS['fd_over_reconstruction_floor']}x the reconstruction floor); "
            f"decoding real training codes, what a generator with exact codes would reach, scores {exact:.2f} "
            f"({exact / floor['reconstruction_frechet_distance']:.2f}x), so the target leaves a generator little room.")


def targets(gan: dict, cgan: dict, baselines: dict, floor: dict) -> dict:
    limit = TARGETS["fd_over_reconstruction_floor"] * floor["reconstruction_frechet_distance"]
    return {
        "cgan_accuracy_at_least_0.99": cgan["accuracy"] >= TARGETS["cgan_accuracy"],
        "cgan_min_digit_at_least_0.97": cgan["min_digit_accuracy"] >= TARGETS["cgan_min_digit_accuracy"],
        "cgan_fd_within_1.5x_reconstruction_floor": cgan["frechet_distance"] <= limit,
        "recall_at_least_0.5": cgan["recall"] >= TARGETS["recall"],
        "gan_recall_at_least_0.5": gan["recall"] >= TARGETS["recall"],
        "gan_beats_gmm": gan["frechet_distance"] < baselines["gmm"]["frechet_distance"],
        "cgan_beats_gmm_per_digit": cgan["frechet_distance"] < baselines["gmm_per_digit"]["frechet_distance"],
    }


def stage(ctx: Context) -> dict:
    """Score both GANs, the flow and both Gaussian-mixture baselines; merge `quality` into the generators' sections."""
    from latentlab.gan import load_gan, sample_images

    cfg = ctx.config.evaluation
    set_threads(2)
    seed, count, k = ctx.config.seed, cfg.samples, cfg.k
    classifier = load_classifier(ctx.run)
    gan, cgan = load_gan(ctx.run, conditional=False), load_gan(ctx.run, conditional=True)
    decoder = ctx.autoencoder.decoder
    real, _ = embed(classifier, ctx.images("test"))
    seconds, start = {}, time.perf_counter()

    def lap(name):  # wall seconds of each part, for the report
        nonlocal start
        seconds[name], start = round(time.perf_counter() - start, 2), time.perf_counter()

    floor = floors(ctx, classifier, real, count, k)
    lap("floors")
    baselines, baseline_images = gmm_baselines(ctx, classifier, real, count, k)
    lap("gmm_baselines")
    gan_images = sample_images(gan, decoder, count, seed=sub_seed(seed, "gan-sample"))
    gan_quality = unconditional_quality(classifier, real, gan_images, k)
    digits = np.arange(count) % 10  # every digit asked for equally often
    cgan_images = sample_images(cgan, decoder, count, digit=digits, seed=sub_seed(seed, "cgan-sample"))
    cgan_quality = conditional_quality(classifier, real, cgan_images, digits, k)
    lap("gans")
    from latentlab.flow import evaluate_flow

    flow = evaluate_flow(ctx, classifier, real, floor, baselines, {"gan": gan, "cgan": cgan},
                         {"gan": gan_quality, "cgan": cgan_quality})
    lap("flow")

    figures.quality_bars({"GAN": gan_quality["frechet_distance"], "GMM": baselines["gmm"]["frechet_distance"],
                          "cGAN": cgan_quality["frechet_distance"],
                          "GMM per digit": baselines["gmm_per_digit"]["frechet_distance"],
                          "flow, no digit": flow["quality_unconditional"]["frechet_distance"],
                          "flow, digit": flow["quality"]["frechet_distance"]},
                         {"real training images": floor["train_vs_test_frechet_distance"],
                          "AE reconstructions of test images": floor["reconstruction_frechet_distance"],
                          "AE reconstructions of training images": floor["train_reconstruction_frechet_distance"]},
                         ctx.run.figures / "evaluation_frechet.png")
    figures.digit_accuracy_bars({"conditional GAN": cgan_quality["accuracy_per_digit"],
                                 "flow with a digit": flow["quality"]["accuracy_per_digit"],
                                 "GMM per digit": baselines["gmm_per_digit"]["accuracy_per_digit"]},
                                ctx.run.figures / "evaluation_digit_accuracy.png", target=TARGETS["cgan_min_digit_accuracy"])
    figures.grid_figure(baseline_images["gmm"][:100], ctx.run.figures / "baseline_gmm_samples.png", rows=10, cols=10,
                        title="Gaussian mixture on the codes: decoded samples")
    by_digit = np.concatenate([baseline_images["gmm_per_digit"][digits == d][:10] for d in range(10)])
    figures.grid_figure(by_digit, ctx.run.figures / "baseline_gmm_per_digit_samples.png", rows=10, cols=10,
                        title="one Gaussian mixture per digit: one row per digit", row_labels=range(10))

    metrics = ctx.run.metrics()
    return {
        "gan": {**metrics.get("gan", {}), "quality": gan_quality},
        "cgan": {**metrics.get("cgan", {}), "quality": cgan_quality},
        "flow": {**metrics.get("flow", {}), **flow},
        "baselines": baselines,
        "evaluation": {
            "samples": count, "k": k, "reference": "the 10,000 test images", "floors": floor,
            "targets": targets(gan_quality, cgan_quality, baselines, floor),
            "verdict": verdict(gan_quality, cgan_quality, baselines, floor),
            "notes": "Distances are in the penultimate features of this run's classifier: comparable only within "
                     "the run. reconstruction_precision/recall compare test images with their own reconstructions, "
                     "which that pairing flatters; train_reconstruction_* is the fair level for a generator that "
                     "decodes through this AE.",
            "seconds": seconds,
        },
    }
