"""What every stage is handed: the run folder, the settings, the device, and data loaded once.

Images live on the run's device as float tensors (the shipped MNIST is 47 MB as float32, so a GPU keeps all
of it resident), and so do each split's latent codes: read from DIR/codes.pt, which the autoencoder stage
writes with its checkpoint, or encoded once per process where that file does not belong to the run's
autoencoder. The autoencoder stage calls `autoencoder_changed()` after it saves a new model.
"""
import os
import zlib

import numpy as np
import torch

from latentlab import data, pixels
from latentlab.config import Config
from latentlab.errors import LatentlabError
from latentlab.models import Autoencoder, CodeStats, batched
from latentlab.runfolder import Run, atomic_write


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else the CPU; 'cuda' without a GPU is an error (names: config.validate)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LatentlabError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def cpu_budget() -> int:
    """The CPU threads this process may use: the cores, or LATENTLAB_THREADS where it is set (`latentlab sweep`
    sets it, so that trials side by side don't fight over cores)."""
    cap = os.environ.get("LATENTLAB_THREADS", "")
    return int(cap) if cap.isdigit() and int(cap) > 0 else os.cpu_count() or 1


def set_threads(n: int) -> None:
    """Small MLPs train fastest on one thread here; the conv nets gain from two."""
    torch.set_num_threads(max(1, min(n, cpu_budget())))


def sub_seed(seed: int, purpose: str) -> int:
    """The seed of one purpose ("gan", "fewshot-draw-3", ...) derived from the run's seed, < 2**32.

    Purposes are mixed in by name, so adding one changes no other; every seed the CLI accepts works.
    """
    return int(np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]).generate_state(1)[0])


def split_seed(path) -> int | None:
    """The seed a split.npz was drawn with, if it says (read_split checks the rest)."""
    try:
        with np.load(path) as f:
            return int(f["seed"]) if "seed" in f.files and f["seed"].shape == () else None
    except Exception:  # damaged: read_split names the fault
        return None


def write_codes(run: Run, codes: dict[str, torch.Tensor]) -> None:
    """DIR/codes.pt: every split's codes, so that later processes load them instead of encoding 70k images."""
    atomic_write(run.root / "codes.pt", lambda f: torch.save(
        {"autoencoder_sha256": run.checkpoint_sha256("autoencoder"), **{k: v.cpu() for k, v in codes.items()}}, f))


def read_codes(run: Run, autoencoder: Autoencoder) -> dict[str, torch.Tensor]:
    """The saved codes if they are the current autoencoder's and of the right shape; else nothing (encode anew)."""
    path = run.root / "codes.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("autoencoder_sha256") != run.checkpoint_sha256("autoencoder"):
            return {}
    except Exception:  # missing, damaged or foreign: encoding again is always right
        return {}
    sizes = {"train": data.N_TRAIN, "val": data.N_VAL}
    latent = autoencoder.encoder.net[-1].out_features
    return {k: v for k, v in saved.items() if k in ("train", "val", "test") and isinstance(v, torch.Tensor)
            and v.dtype == torch.float32 and v.ndim == 2 and v.shape[1] == latent and len(v) == sizes.get(k, len(v))
            and bool(torch.isfinite(v).all())}


class Context:
    """Lazily loaded data and models for the stages of one run, cached for the life of the process."""

    def __init__(self, run: Run, config: Config, device: torch.device = torch.device("cpu"), *, threads: int = 2):
        self.run, self.config, self.device = run, config, torch.device(device)
        self.threads = threads   # CPU threads a stage may use (1 while another stage runs beside it)
        self._dataset: data.Dataset | None = None
        self._split: dict[str, np.ndarray] | None = None
        self._images: dict[str, torch.Tensor] = {}
        self._autoencoder: Autoencoder | None = None
        self._code_stats: CodeStats | None = None
        self._codes: dict[str, torch.Tensor] | None = None  # None: DIR/codes.pt not read yet
        self.test_reference = None  # (classifier checkpoint's stamp, Reference): classifier.reference_of_test_images

    @property
    def dataset(self) -> data.Dataset:
        if self._dataset is None:
            self._dataset = data.load(self.config.data_dir)
        return self._dataset

    @property
    def split(self) -> dict[str, np.ndarray]:
        """The 55k/5k train/validation split, made once per run from its seed and saved in split.npz."""
        if self._split is None:
            path = self.run.root / "split.npz"
            if path.exists() and split_seed(path) in (None, self.config.seed):  # None: written before seeds were kept
                from latentlab.checks import read_split

                self._split = read_split(path, len(self.dataset.train_images))
            else:  # none yet, or another seed's (a run folder reused with --seed): this seed's split
                self._split = data.split_indices(self.config.seed, len(self.dataset.train_images))
                atomic_write(path, lambda f: np.savez(f, seed=self.config.seed, **self._split))
        return self._split

    def images(self, part: str) -> torch.Tensor:
        """(N, 1, 28, 28) float images in [0, 1] of 'train' (55k), 'val' (5k) or 'test' (10k), on the device."""
        if part not in self._images:
            raw = self.dataset.test_images if part == "test" else self.dataset.train_images[self.split[part]]
            self._images[part] = pixels.to_float(torch.from_numpy(raw).to(self.device))
        return self._images[part]

    def labels(self, part: str) -> np.ndarray:
        if part == "test":
            return self.dataset.test_labels
        return self.dataset.train_labels[self.split[part]]

    @property
    def autoencoder(self) -> Autoencoder:
        """The run's trained autoencoder, frozen, on the device."""
        if self._autoencoder is None:
            model, ckpt = self.run.load_model("autoencoder", Autoencoder, "train-ae")
            self._autoencoder = model.to(self.device).requires_grad_(False)
            if "code_mean" in ckpt:  # runs before code statistics were kept with the AE compute them below
                self._code_stats = CodeStats(ckpt["code_mean"].float(), ckpt["code_std"].float())
        return self._autoencoder

    def autoencoder_changed(self) -> None:
        """Forget the loaded AE and every code it made: the next use reloads the newly saved one."""
        self._autoencoder, self._code_stats, self._codes = None, None, None

    def codes(self, part: str) -> torch.Tensor:
        """Latent codes (N, latent_dim) of a split, on the device: from DIR/codes.pt, which the autoencoder stage
        writes, when it belongs to the run's autoencoder; else encoded here, once per process."""
        if self._codes is None:
            self._codes = {k: v.to(self.device) for k, v in read_codes(self.run, self.autoencoder).items()}
        if part not in self._codes:
            self._codes[part] = batched(self.autoencoder.encoder, self.images(part), self.device)
        return self._codes[part]

    @property
    def code_stats(self) -> CodeStats:
        """Mean and std of the training codes, as kept in the AE's checkpoint."""
        self.autoencoder  # loads the statistics with the model
        if self._code_stats is None:
            self._code_stats = CodeStats.of(self.codes("train"))
        return CodeStats(self._code_stats.mean.to(self.device), self._code_stats.std.to(self.device))

    def standardised_codes(self, part: str) -> torch.Tensor:
        return self.code_stats.standardise(self.codes(part))
