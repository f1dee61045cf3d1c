"""Matplotlib figures, written to a path with the Agg backend (never shown)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _as_numpy(images) -> np.ndarray:
    """Tensor or array of (N, 1, 28, 28) or (N, 28, 28) -> float array (N, 28, 28)."""
    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return images.reshape(len(images), 28, 28)


def image_grid(images, rows: int, cols: int) -> np.ndarray:
    """Tile (rows * cols) images into one (rows * 28, cols * 28) array, ink bright on black."""
    images = _as_numpy(images)[: rows * cols]
    grid = np.zeros((rows * 28, cols * 28), dtype=images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = image
    return grid


def grid_figure(images, path: Path, *, rows: int, cols: int, title: str = "", row_labels=None) -> Path:
    fig, ax = plt.subplots(figsize=(cols * 0.6 + 0.6, rows * 0.6 + 0.5))
    ax.imshow(image_grid(images, rows, cols), cmap="gray", vmin=0, vmax=1 if _as_numpy(images).max() <= 1 else 255)
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
