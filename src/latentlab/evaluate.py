"""Stages `baselines` and `evaluation`: how good are the generated digits, measured by the project's own classifier.

Every generator (the two GANs, the flow and their Gaussian-mixture baselines) is scored the same way on `samples`
images against the 10k test images: Frechet distance and k-NN precision/recall in the classifier's
penultimate features, the share classified as the digit asked for (conditional models), and the class
histogram (plain models; mode collapse shows there). Floors put the distances in scale: real training
images (what a perfect generator would score) and the AE's reconstructions (about the best a generator
decoding through this AE can hope for). The Gaussian mixtures are the baseline the latent-GAN literature
found hard to beat; the verdict says plainly whether the GANs beat them. The floors and the mixtures read only
the codes and the classifier: their own stage (`stage_baselines`) runs beside the generators' training.
"""
import time

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from latentlab import figures, pixels
from latentlab.autoencoder import decode
from latentlab.classifier import features_and_proba, load_classifier, reference_of_test_images
from latentlab.context import Context, set_threads, sub_seed
from latentlab.errors import LatentlabError
from latentlab.metrics import Reference

TARGETS = {"cgan_accuracy": 0.99, "cgan_min_digit_accuracy": 0.97, "fd_over_reconstruction_floor": 1.5, "recall": 0.5}


def embed(classifier, images) -> tuple[torch.Tensor, np.ndarray]:
    """(features (N, F) on the classifier's device, predicted digit (N,)) in one pass."""
    feats, proba = features_and_proba(classifier, images)
    return feats, proba.argmax(axis=1)


def class_histogram(predicted: np.ndarray) -> list[float]:
    return (np.bincount(predicted, minlength=10) / len(predicted)).tolist()


def unconditional_quality(classifier, real: Reference, images) -> dict:
    feats, predicted = embed(classifier, images)
    return {**real.distances(feats), "class_histogram": class_histogram(predicted), "samples": len(images)}


def conditional_quality(classifier, real: Reference, images, digits: np.ndarray) -> dict:
    feats, predicted = embed(classifier, images)
    # a digit with no image among them has no share (a small sample of real images), not NaN
    per_digit = {str(d): float(np.mean(predicted[digits == d] == d)) if np.any(digits == d) else None
                 for d in range(10)}
    shares = [v for v in per_digit.values() if v is not None]
    return {"accuracy": float(np.mean(predicted == digits)), "accuracy_per_digit": per_digit,
            "min_digit_accuracy": min(shares) if shares else None, **real.distances(feats),
            "class_histogram": class_histogram(predicted), "samples": len(images)}


def fit_gmm(train: torch.Tensor, val: torch.Tensor, components: int, seed: int,
            tol: float = 1e-3) -> tuple[GaussianMixture, dict]:
    """A full-covariance mixture on `train` codes, scored by its mean log-likelihood per code on `val`.

    On CUDA it fits on the GPU through scikit-learn's array-API dispatch (scikit-learn >= 1.8 with
    array-api-compat; it needs random initialisation there). Elsewhere, or where that is missing, it fits
    numpy arrays with k-means initialisation on one BLAS thread (OpenBLAS threads spin on a shared machine).
    """
    info = {"components": components, "covariance_type": "full", "fitted_codes": len(train), "tol": tol}
    if train.device.type == "cuda":
        try:
            from sklearn import config_context

            with config_context(array_api_dispatch=True):
                gmm = GaussianMixture(components, covariance_type="full", max_iter=200, tol=tol, random_state=seed,
                                      init_params="random_from_data").fit(train.double())
                score = float(gmm.score(val.double()))
            for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
                if torch.is_tensor(getattr(gmm, name, None)):  # numpy again, so sampling needs no dispatch
                    setattr(gmm, name, getattr(gmm, name).cpu().numpy())
            return gmm, {**info, "val_log_likelihood": score, "fitted_on": "cuda (array API)"}
        except (ImportError, ValueError, TypeError, RuntimeError) as e:  # no array-api-compat, an old sklearn
            info["cuda_fallback"] = f"fitted on the CPU: {type(e).__name__}: {str(e)[:120]}"
    with threadpool_limits(limits=1, user_api="blas"):
        gmm = GaussianMixture(components, covariance_type="full", max_iter=200, tol=tol, random_state=seed)
        gmm.fit(train.double().cpu().numpy())
        score = float(gmm.score(val.double().cpu().numpy()))
    return gmm, {**info, "val_log_likelihood": score, "fitted_on": "cpu"}


def sample_gmm(gmm: GaussianMixture, count: int, decoder, seed: int) -> np.ndarray:
    """`count` decoded images (uint8) from a fitted mixture, in random order (sklearn groups them by component)."""
    gmm.random_state = seed
    codes, _ = gmm.sample(count)
    codes = torch.as_tensor(codes if torch.is_tensor(codes) else np.asarray(codes)).float()
    codes = codes[torch.from_numpy(np.random.default_rng(seed).permutation(count)).to(codes.device)]
    return pixels.to_uint8(decode(decoder, codes))


def gmm_baselines(ctx: Context, classifier, real: Reference, count: int) -> tuple[dict, dict]:
    """The baseline the latent-GAN literature found hard to beat: Gaussian mixtures on the AE codes.

    Returns the `baselines` section and the sample images (for the figures).
    """
    cfg, seed, decoder = ctx.config.evaluation, ctx.config.seed, ctx.autoencoder.decoder
    train, val = ctx.codes("train"), ctx.codes("val")
    train_labels, val_labels = ctx.labels("train"), ctx.labels("val")

    # a seeded subset keeps the one large fit within budget (80 components on 20k codes fit the validation
    # codes better than 40 on all 55k, in a quarter of the time)
    subset = np.random.default_rng(sub_seed(seed, "gmm-subset")).permutation(len(train))[:cfg.gmm_fit_limit]
    gmm, choice = fit_gmm(train[torch.from_numpy(np.sort(subset)).to(train.device)], val, cfg.gmm_components,
                          sub_seed(seed, "gmm"), cfg.gmm_tol)
    plain_images = sample_gmm(gmm, count, decoder, sub_seed(seed, "gmm-sample"))
    plain = {**choice, **unconditional_quality(classifier, real, plain_images)}

    # one mixture per digit, asked for each digit equally often (like the conditional GAN)
    digits = np.arange(count) % 10
    per_digit_images = np.zeros((count, 28, 28), dtype=np.uint8)
    choices = []
    for d in tqdm(range(10), desc="per-digit mixtures", leave=False):
        gmm_d, choice_d = fit_gmm(train[torch.from_numpy(train_labels == d).to(train.device)],
                                  val[torch.from_numpy(val_labels == d).to(val.device)],
                                  cfg.gmm_components_per_digit, sub_seed(seed, f"gmm-digit-{d}"), cfg.gmm_tol)
        per_digit_images[digits == d] = sample_gmm(gmm_d, int(np.sum(digits == d)), decoder,
                                                   sub_seed(seed, f"gmm-digit-{d}-sample"))
        choices.append(choice_d)
    per_digit = {
        "components": [c["components"] for c in choices], "covariance_type": choices[0]["covariance_type"],
        "val_log_likelihood": [c["val_log_likelihood"] for c in choices],
        **conditional_quality(classifier, real, per_digit_images, digits),
    }
    return {"gmm": plain, "gmm_per_digit": per_digit}, {"gmm": plain_images, "gmm_per_digit": per_digit_images}


def floors(ctx: Context, classifier, real: Reference, count: int) -> dict:
    """What real images score (train vs test) and what the AE allows (its reconstructions).

    All use `count` images, like the generators: the Frechet distance of a finite sample is biased upwards by
    an amount that depends on the sample size. Reconstructions of the test images themselves sit next to
    their own originals, which flatters their precision/recall; reconstructions of training images are the
    fair level for a generator that decodes through this AE, so both are reported.
    """
    rng = np.random.default_rng(sub_seed(ctx.config.seed, "floors"))
    decoder = ctx.autoencoder.decoder
    train_chosen = torch.from_numpy(rng.choice(len(ctx.codes("train")), count, replace=False)).to(ctx.device)
    train = real.distances(embed(classifier, ctx.images("train")[train_chosen])[0])
    train_recon_images = pixels.to_uint8(decode(decoder, ctx.codes("train")[train_chosen]))
    train_recon = real.distances(embed(classifier, train_recon_images)[0])
    test_chosen = rng.choice(len(real.features), count, replace=False)
    recon_images = pixels.to_uint8(decode(decoder, ctx.codes("test")[torch.from_numpy(test_chosen).to(ctx.device)]))
    recon = conditional_quality(classifier, real, recon_images, ctx.labels("test")[test_chosen])
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


def stage_baselines(ctx: Context) -> dict:
    """The floors and both Gaussian-mixture baselines: they read only the codes and the classifier, so this
    stage runs beside the generators' training instead of after it. Writes `baselines` and `evaluation.floors`
    (the evaluation stage, which reads this one, keeps them)."""
    cfg = ctx.config.evaluation
    set_threads(ctx.threads)
    classifier = load_classifier(ctx.run).to(ctx.device)
    real = reference_of_test_images(ctx, classifier)
    floor = floors(ctx, classifier, real, cfg.samples)
    baselines, images = gmm_baselines(ctx, classifier, real, cfg.samples)
    figures.grid_figure(images["gmm"][:100], ctx.run.figures / "baseline_gmm_samples.png", rows=10, cols=10,
                        title="Gaussian mixture on the codes: decoded samples")
    digits = np.arange(cfg.samples) % 10  # the per-digit samples ask for every digit in turn
    by_digit = np.concatenate([images["gmm_per_digit"][digits == d][:10] for d in range(10)])
    figures.grid_figure(by_digit, ctx.run.figures / "baseline_gmm_per_digit_samples.png", rows=10, cols=10,
                        title="one Gaussian mixture per digit: one row per digit", row_labels=range(10))
    return {"baselines": baselines, "evaluation": {"floors": floor}}


def stage(ctx: Context) -> dict:
    """Score both GANs and the flow, beside the floors and baselines of stage_baselines; merge `quality` into the
    generators' sections."""
    from latentlab.gan import load_gan, sample_images

    cfg = ctx.config.evaluation
    set_threads(ctx.threads)
    seed, count, k = ctx.config.seed, cfg.samples, cfg.k
    classifier = load_classifier(ctx.run).to(ctx.device)
    gan, cgan = (load_gan(ctx.run, conditional=c, device=ctx.device) for c in (False, True))
    decoder = ctx.autoencoder.decoder
    metrics = ctx.run.metrics()
    if "baselines" not in metrics or "floors" not in metrics.get("evaluation", {}):
        raise LatentlabError(f"{ctx.run.root}: the floors and Gaussian-mixture baselines are missing; "
                             f"`latentlab evaluate --run {ctx.run.root}` makes them first")
    baselines, floor = metrics["baselines"], metrics["evaluation"]["floors"]
    seconds, start = {}, time.perf_counter()
    real = reference_of_test_images(ctx, classifier)  # the test set's statistics, made once

    def lap(name):  # wall seconds of each part, for the report
        nonlocal start
        seconds[name], start = round(time.perf_counter() - start, 2), time.perf_counter()
        set_threads(ctx.threads)  # started beside the last stage, it takes both cores once that one ends

    lap("reference")
    gan_images = sample_images(gan, decoder, count, seed=sub_seed(seed, "gan-sample"))
    gan_quality = unconditional_quality(classifier, real, gan_images)
    digits = np.arange(count) % 10  # every digit asked for equally often
    cgan_images = sample_images(cgan, decoder, count, digit=digits, seed=sub_seed(seed, "cgan-sample"))
    cgan_quality = conditional_quality(classifier, real, cgan_images, digits)
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
    return {
        "gan": {**metrics.get("gan", {}), "quality": gan_quality},
        "cgan": {**metrics.get("cgan", {}), "quality": cgan_quality},
        "flow": {**metrics.get("flow", {}), **flow},
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
