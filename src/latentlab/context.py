"""What every stage is handed: the run folder, the settings, the device, and lazily loaded data."""
import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from latentlab import data
from latentlab.config import Config
from latentlab.errors import LatentlabError
from latentlab.runfolder import Run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LatentlabError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise LatentlabError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def set_threads(n: int) -> None:
    """Small MLPs train fastest on one thread here; the conv nets gain from two.

    LATENTLAB_THREADS caps it: `latentlab sweep` sets it so trials side by side don't fight over cores.
    """
    cap = os.environ.get("LATENTLAB_THREADS", "")
    cap = int(cap) if cap.isdigit() and int(cap) > 0 else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(n, cap)))


@dataclass
class Context:
    run: Run
    config: Config
    device: torch.device = field(default=torch.device("cpu"))

    @cached_property
    def dataset(self) -> data.Dataset:
        return data.load(self.config.data_dir)

    @cached_property
    def split(self) -> dict[str, np.ndarray]:
        """The 55k/5k train/validation split, made once per run from its seed and saved in split.npz."""
        path = self.run.root / "split.npz"
        if path.exists():
            try:
                with np.load(path) as f:
                    return {"train": f["train"], "val": f["val"]}
            except Exception as e:
                raise LatentlabError(f"{path}: damaged split file ({type(e).__name__}); delete it to redraw") from None
        split = data.split_indices(self.config.seed, len(self.dataset.train_images))
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **split)
        os.replace(tmp, path)
        return split

    def images(self, part: str) -> torch.Tensor:
        """(N, 1, 28, 28) float images in [0, 1] of 'train' (55k), 'val' (5k) or 'test' (10k)."""
        if part == "test":
            return data.to_tensor(self.dataset.test_images)
        return data.to_tensor(self.dataset.train_images[self.split[part]])

    def labels(self, part: str) -> np.ndarray:
        if part == "test":
            return self.dataset.test_labels
        return self.dataset.train_labels[self.split[part]]

    @cached_property
    def autoencoder(self):
        from latentlab.autoencoder import load_autoencoder

        return load_autoencoder(self.run)

    def codes(self, part: str) -> torch.Tensor:
        """Latent codes (N, latent_dim) of a split, encoded once per process with the frozen encoder."""
        cache = self.__dict__.setdefault("_codes", {})
        if part not in cache:
            from latentlab.autoencoder import encode

            cache[part] = encode(self.autoencoder.encoder, self.images(part))
        return cache[part]
