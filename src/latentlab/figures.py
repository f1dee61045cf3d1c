"""Matplotlib figures, written to a path with the Agg backend (never shown)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from latentlab import pixels  # noqa: E402
from latentlab.runfolder import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _as_numpy(images) -> np.ndarray:
    """Tensor or array of (N, 1, 28, 28) or (N, 28, 28) -> float array (N, 28, 28)."""
    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return images.reshape(len(images), 28, 28)


def grid_figure(images, path: Path, *, rows: int, cols: int, title: str = "", row_labels=None) -> Path:
    fig, ax = plt.subplots(figsize=(cols * 0.6 + 0.6, rows * 0.6 + 0.5))
    images = _as_numpy(images)[:rows * cols]
    ax.imshow(pixels.grid(images, cols), cmap="gray", vmin=0, vmax=1 if images.max() <= 1 else 255)
    ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks([r * 28 + 14 for r in range(rows)], [str(label) for label in row_labels])
        ax.tick_params(left=False)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def reconstructions(originals, reconstructed, path: Path) -> Path:
    """Test digits (top row) over their reconstructions (bottom row)."""
    n = len(originals)
    both = np.concatenate([_as_numpy(originals), _as_numpy(reconstructed)])
    return grid_figure(both, path, rows=2, cols=n, title="test digits (top) and their reconstructions (bottom)",
                       row_labels=["input", "recon"])


def loss_curves(history: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = np.arange(1, len(history["train_bce"]) + 1)
    ax.plot(epochs, history["train_bce"], "o-", label="train BCE")
    ax.plot(epochs, history["val_bce"], "s-", label="validation BCE")
    ax.set_xlabel("epoch")
    ax.set_ylabel("binary cross-entropy per pixel")
    ax.set_title("autoencoder training")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gan_losses(history: dict, path: Path, *, title: str = "GAN training") -> Path:
    """Discriminator and generator losses (means over `log_every` steps) against the step."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["step"], history["loss_d"], label="discriminator")
    ax.plot(history["step"], history["loss_g"], label="generator")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def quality_bars(values: dict, floors: dict, path: Path) -> Path:
    """Frechet distance of each generator (bars) with the floors (dashed lines); lower is better."""
    fig, ax = plt.subplots(figsize=(1.1 * len(values) + 1.1, 3.4))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=["C0", "C7", "C1", "C7", "C2", "C2"][:len(names)])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for (label, value), style in zip(floors.items(), ("--", ":", "-.")):
        ax.axhline(value, color="k", linestyle=style, linewidth=1, label=f"{label}: {value:.2f}")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.set_title("sample quality vs the test set (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def digit_accuracy_bars(per_model: dict, path: Path, *, target: float | None = None) -> Path:
    """Share of samples classified as the digit asked for, per digit, one bar group per digit."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / len(per_model)
    lowest = 1.0
    for i, (name, accuracy) in enumerate(per_model.items()):
        shares = [np.nan if accuracy[str(d)] is None else accuracy[str(d)] for d in range(10)]  # None: no sample
        lowest = min(lowest, *[s for s in shares if not np.isnan(s)])
        ax.bar(np.arange(10) + (i - (len(per_model) - 1) / 2) * width, shares, width, label=name)
    if target is not None:
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xticks(range(10))
    ax.set_xlabel("digit asked for")
    ax.set_ylabel("classified as asked")
    ax.set_ylim(max(0.0, min(lowest, target or 1.0) - 0.03), 1.0)
    ax.set_title("conditional accuracy per digit")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def fewshot_curves(curves: dict, reference: dict, path: Path) -> Path:
    """Validation accuracy per epoch of the reference MLP in both regimes: mean and spread over draws."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    epochs = np.asarray(curves["epochs"])
    for name, label, color in (("seed_mlp_frozen", "frozen codes", "tab:blue"),
                               ("seed_mlp_end_to_end", "end to end (encoder fine-tuned)", "tab:orange")):
        mean, std = np.asarray(curves[name]["mean"]), np.asarray(curves[name]["std"])
        ax.plot(epochs, mean, color=color, label=f"{label}: mean over draws")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
        if name in reference:
            ax.axhline(reference[name], color=color, linestyle="--", linewidth=1,
                       label=f"reference report, {label}: {reference[name]:.1%}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"reference MLP (128 sigmoid, 512 sigmoid) on 50 labels\n"
                 f"validation sample of {curves['val_images']} images; band = ±1 std over draws", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def fewshot_methods(methods: dict, reference: dict, best: str, path: Path) -> Path:
    """Mean test accuracy of every few-label method with ±1 std error bars and the worst draw."""
    names = sorted(methods, key=lambda n: methods[n]["test_accuracy"]["mean"])
    colors = {"graph": "tab:green", "self-training": "tab:purple", "mlp": "tab:blue", "baseline": "tab:gray"}
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(names) + 1.2))
    y = np.arange(len(names))
    means = [methods[n]["test_accuracy"]["mean"] for n in names]
    stds = [methods[n]["test_accuracy"]["std"] for n in names]
    ax.barh(y, means, xerr=stds, color=[colors.get(methods[n].get("family"), "tab:blue") for n in names],
            capsize=2, alpha=0.85)
    ax.plot([methods[n]["test_accuracy"]["min"] for n in names], y, "k|", markersize=8, label="worst draw")
    for name, value in reference.items():
        ax.axvline(value, color="tab:red", linestyle=":", linewidth=1)
        ax.text(value, len(names) - 0.4, f"ref. {name.replace('seed_mlp_', '')}", fontsize=6, color="tab:red",
                rotation=90, va="top", ha="right")
    ax.set_yticks(y, [n + (" (best)" if n == best else "") for n in names], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy (10k images): mean ± std over draws")
    ax.set_title("few-label classification, 50 labels (green: graph methods using unlabelled codes)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def loss_history(history: dict, path: Path, *, title: str) -> Path:
    """One training loss (means over `log_every` steps) against the step."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["step"], history["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def flow_sweep(steps: dict, guidance: dict, floor: float, path: Path, *, note: str) -> Path:
    """Frechet distance against the number of ODE steps (left) and the guidance scale (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, values, label in ((left, steps, "ODE steps (log scale)"), (right, guidance, "guidance scale")):
        xs = [float(x) for x in values]
        ax.plot(xs, list(values.values()), "o-")
        ax.axhline(floor, color="k", linestyle="--", linewidth=1, label=f"exact codes: {floor:.2f}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    left.set_xscale("log", base=2)
    left.set_ylabel("Frechet distance")
    left.legend(fontsize=8)
    fig.suptitle(f"latent flow: {note}", fontsize=9)
    return _save(fig, path)


def stage_timeline(bars: list[tuple[str, str, float, float]], path: Path, *, title: str) -> Path:
    """Where a run's time went: each stage a bar on the lane of the process that ran it.

    `bars`: (lane, stage, start, seconds), start in seconds since the pipeline began."""
    lanes = list(dict.fromkeys(lane for lane, *_ in bars))
    end = max(start + seconds for _, _, start, seconds in bars)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(lanes) + 1.3))
    colours = plt.get_cmap("tab10")
    for i, (lane, stage, start, seconds) in enumerate(bars):
        y = lanes.index(lane)
        ax.barh(y, seconds, left=start, height=0.6, color=colours(i % 10), edgecolor="white")
        if seconds > 0.045 * end:  # names that fit inside their bar; the table beside the figure has every stage
            ax.text(start + seconds / 2, y, stage, ha="center", va="center", fontsize=8, color="white")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel("seconds since the pipeline started (Python's start and imports before it are not drawn)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
