import gzip
import shutil

import numpy as np
import pytest

from latentlab import data
from latentlab.errors import LatentlabError


def test_shipped_mnist_loads_and_verifies():
    ds = data.load()
    assert ds.train_images.shape == (60_000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10_000, 28, 28)
    assert set(np.unique(ds.train_labels)) == set(range(10))
    assert ds.source == "shipped MNIST"


def test_split_is_seeded_disjoint_and_complete():
    a, b, c = data.split_indices(0), data.split_indices(0), data.split_indices(1)
    assert len(a["train"]) == 55_000 and len(a["val"]) == 5_000
    assert not set(a["train"]) & set(a["val"])
    assert np.array_equal(a["val"], b["val"]) and not np.array_equal(a["val"], c["val"])


@pytest.fixture
def copy_of_mnist(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(data.shipped_dir(), folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def _rewrite(path, change):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(change(raw)), compresslevel=1))


def test_altered_shipped_file_fails_the_checksum(copy_of_mnist, monkeypatch):
    def flip_one_pixel(raw):
        raw[-1] ^= 0xFF
        return raw
    _rewrite(copy_of_mnist / "t10k-images-idx3-ubyte.gz", flip_one_pixel)
    monkeypatch.setattr(data, "shipped_dir", lambda: copy_of_mnist)
    with pytest.raises(LatentlabError, match="t10k-images.*SHA-256"):
        data.load()


def test_copy_of_mnist_loads_as_data_dir(copy_of_mnist):
    ds = data.load(copy_of_mnist)
    assert ds.train_images.shape == (60_000, 28, 28) and ds.source != "shipped MNIST"


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-100], "truncated"),
    (lambda raw: b"\x00\x00\x09\x99" + raw[4:], "magic"),
])
def test_damaged_data_dir_file_is_named(copy_of_mnist, damage, message):
    _rewrite(copy_of_mnist / "t10k-images-idx3-ubyte.gz", damage)
    with pytest.raises(LatentlabError, match=f"t10k-images.*{message}"):
        data.load(copy_of_mnist)


def test_label_out_of_range_and_missing_and_not_gzip(copy_of_mnist):
    def label_eleven(raw):
        raw[8] = 11
        return raw
    _rewrite(copy_of_mnist / "t10k-labels-idx1-ubyte.gz", label_eleven)
    with pytest.raises(LatentlabError, match="label 11"):
        data.load(copy_of_mnist)
    (copy_of_mnist / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(LatentlabError, match="t10k-labels.*decompress"):
        data.load(copy_of_mnist)
    # a gzip header, then a damaged compressed stream (zlib's own error, not gzip's)
    damaged = bytearray(gzip.compress(bytes(range(256)) * 40))
    damaged[10:30] = bytes(range(200, 220))
    (copy_of_mnist / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(damaged))
    with pytest.raises(LatentlabError, match="t10k-labels.*decompress"):
        data.load(copy_of_mnist)
    (copy_of_mnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(LatentlabError, match="t10k-labels.*missing"):
        data.load(copy_of_mnist)
