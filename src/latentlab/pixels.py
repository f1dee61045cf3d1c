"""Pixels both ways and grids of digits: the one home for these conversions (numpy, torch and Pillow only,
so a cold `latentlab sample` never imports matplotlib).

Two forms of an image batch travel through latentlab:
- float tensors (N, 1, 28, 28) in [0, 1], what the networks take and the decoder gives;
- uint8 arrays (N, 28, 28) with 255 = ink, what MNIST's IDX files, `sample`'s .npz files and PNGs hold.
"""
import math

import numpy as np
import torch


def to_float(images) -> torch.Tensor:
    """uint8 array or tensor (N, 28, 28), 255 = ink -> float tensor (N, 1, 28, 28) in [0, 1].

    A float tensor is passed through (reshaped to (N, 1, 28, 28)); any other dtype is refused, since
    dividing the wrong kind of pixels by 255 silently gives a blank image.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            from latentlab.errors import LatentlabError

            raise LatentlabError(f"images: expected uint8 pixels 0..255, got {images.dtype}")
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0).reshape(len(images), 1, 28, 28)
    return images.float().reshape(len(images), 1, 28, 28)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images (N, 1, 28, 28) in [0, 1] -> uint8 array (N, 28, 28), rounded to the nearest level."""
    return images.detach().reshape(len(images), 28, 28).mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def grid(images: np.ndarray, cols: int | None = None, *, pad: int = 0, pad_value: int = 0, scale: int = 1,
         outer: bool = False) -> np.ndarray:
    """Tile images (N, 28, 28) into one picture, `cols` a row (default ceil(sqrt(N))).

    Each digit is drawn `scale` times larger (nearest pixel), `pad` pixels of `pad_value` between digits,
    and around the whole grid too when `outer`. Empty cells stay `pad_value`.
    """
    images = np.asarray(images)
    images = images.reshape(len(images), 28, 28)
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell, edge = 28 * scale, pad if outer else 0
    picture = np.full((rows * cell + (rows - 1) * pad + 2 * edge, cols * cell + (cols - 1) * pad + 2 * edge),
                      pad_value, dtype=images.dtype)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else images
    for i, image in enumerate(big):
        r, c = divmod(i, cols)
        top, left = edge + r * (cell + pad), edge + c * (cell + pad)
        picture[top:top + cell, left:left + cell] = image
    return picture


def write_grid_png(images: np.ndarray, path) -> None:
    """uint8 (N, 28, 28) -> one grayscale PNG, ceil(sqrt(N)) digits a row, 2 black pixels between and around them."""
    from PIL import Image

    Image.fromarray(grid(images, pad=2, outer=True), mode="L").save(path, format="PNG")
