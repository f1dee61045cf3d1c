"""MNIST-format data: the shipped MNIST (checked against SHA-256 sums) or any folder of IDX files."""
import gzip
import hashlib
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from latentlab.errors import LatentlabError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the decompressed IDX files of the real MNIST, as in shared/data/mnist/SHA256SUMS.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
N_TRAIN, N_VAL = 55_000, 5_000


@dataclass
class Dataset:
    """uint8 images (N, 28, 28) with ink = 255, int64 labels (N,). `source` says where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def shipped_dir() -> Path:
    return Path(str(resources.files("latentlab") / "mnist"))


def _read_file(folder: Path, stem: str) -> tuple[bytes, Path]:
    """Bytes of `stem`, from `stem.gz` or plain `stem`, decompressed."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            try:
                raw = path.read_bytes()
                return (gzip.decompress(raw) if path.suffix == ".gz" else raw), path
            except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib: a damaged compressed stream
                raise LatentlabError(f"{path}: cannot be read or decompressed ({e})") from None
    raise LatentlabError(f"{folder / (stem + '.gz')}: file is missing (need the four MNIST-format IDX files)")


def _parse_idx(data: bytes, path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file with numpy, checking its magic number and its size against the header."""
    if len(data) < 8:
        raise LatentlabError(f"{path}: truncated ({len(data)} bytes, no IDX header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise LatentlabError(f"{path}: wrong magic number {found} (expected {magic}); not an IDX file of this kind")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise LatentlabError(f"{path}: size is {len(data)} bytes but its header promises {expected}; truncated or damaged")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    if magic == IMAGE_MAGIC and tuple(dims[1:]) != (28, 28):
        raise LatentlabError(f"{path}: images are {dims[1:]} pixels, expected 28x28")
    return array


def load(data_dir: str | Path | None = None) -> Dataset:
    """Load the shipped MNIST (verified by SHA-256) or the IDX files in `data_dir` (checked for structure)."""
    shipped = data_dir is None
    folder = shipped_dir() if shipped else Path(data_dir)
    if not folder.is_dir():
        raise LatentlabError(f"--data-dir {folder}: not a folder")
    arrays = {}
    for key, stem in FILES.items():
        data, path = _read_file(folder, stem)
        if shipped and hashlib.sha256(data).hexdigest() != MNIST_SHA256[stem]:
            raise LatentlabError(f"{path}: SHA-256 does not match the real MNIST; the shipped file is altered or damaged")
        arrays[key] = _parse_idx(data, path, IMAGE_MAGIC if key.endswith("images") else LABEL_MAGIC)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise LatentlabError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        if labels.max(initial=0) > 9:
            raise LatentlabError(f"{folder / FILES[split + '_labels']}: label {labels.max()} is outside 0-9")
    if len(arrays["train_images"]) < N_TRAIN + N_VAL:
        raise LatentlabError(f"{folder}: need {N_TRAIN + N_VAL} training images, found {len(arrays['train_images'])}")
    return Dataset(
        train_images=arrays["train_images"], train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"], test_labels=arrays["test_labels"].astype(np.int64),
        source="shipped MNIST" if shipped else str(folder.resolve()),
    )


def split_indices(seed: int, n: int = N_TRAIN + N_VAL) -> dict[str, np.ndarray]:
    """Seeded 55,000 / 5,000 train / validation split of the training set."""
    order = np.random.default_rng(seed).permutation(n)
    return {"train": np.sort(order[:N_TRAIN]), "val": np.sort(order[N_TRAIN:N_TRAIN + N_VAL])}


def dataset_name(data_dir: str | Path | None) -> str:
    """"MNIST" for the shipped files or a folder holding exactly them (by SHA-256); otherwise the folder's name."""
    if data_dir is None:
        return "MNIST"
    folder = Path(data_dir)
    try:
        for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "train-images-idx3-ubyte"):  # the small files first: another dataset differs at once
            if hashlib.sha256(_read_file(folder, stem)[0]).hexdigest() != MNIST_SHA256[stem]:
                return folder.name or str(folder)
    except LatentlabError:
        return folder.name or str(folder)
    return "MNIST"
