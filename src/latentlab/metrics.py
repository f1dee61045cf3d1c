"""Sample-quality metrics in a feature space: Frechet distance and k-NN precision/recall.

Both take (N, F) feature sets, here the penultimate activations of the project's digit classifier, so the
numbers are comparable only between sets embedded by the same classifier (always report the floors beside them).
They run in torch on the features' own device (numpy arrays run on the CPU). The real set is usually the same
10k test images for every generator, so `Reference` prepares its statistics and k-NN radii once.
"""
import numpy as np
import torch

from latentlab.models import inference_batch


def _as_tensor(features, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features).to(dtype)


def _check(a, b, least: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = _as_tensor(a)
    b = _as_tensor(b).to(a.device)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, F) feature arrays of the same F, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(len(a), len(b)) < least:
        raise ValueError(f"need at least {least} samples in each set, got {len(a)} and {len(b)}")
    return a, b


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues from rounding -> 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2), all float64.

    tr((S_a S_b)^1/2) is the sum of square roots of the eigenvalues of S_b^1/2 S_a S_b^1/2, which is
    symmetric PSD: real and stable where a general matrix square root of the product can turn complex.
    """
    root_b = _sqrt_psd(cov_b)
    cross = torch.linalg.eigvalsh(root_b @ cov_a @ root_b).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(distance.clamp_min(0))


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula, Heusel et al. 2017)."""
    a, b = _check(features_a, features_b, least=2)
    return _frechet(*_mean_cov(a), *_mean_cov(b))


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.float(), b.float())


def knn_radii(features, k: int, batch_size: int | None = None) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    x = _as_tensor(features, torch.float32)
    batch_size = batch_size or inference_batch(x.device)
    return torch.cat([_pairwise(x[i:i + batch_size], x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(x), batch_size)])  # column 0 is the point itself


def _precision_recall(real, real_radii, fake, fake_radii, batch_size: int | None) -> dict:
    batch_size = batch_size or inference_batch(fake.device)
    fake_inside = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_inside = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start in range(0, len(fake), batch_size):  # (batch, N_real) distances at a time: bounded memory
        distances = _pairwise(fake[start:start + batch_size], real)
        fake_inside[start:start + batch_size] = (distances <= real_radii[None, :]).any(dim=1)
        real_inside |= (distances <= fake_radii[start:start + batch_size, None]).any(dim=0)
    return {"precision": float(fake_inside.float().mean()), "recall": float(real_inside.float().mean())}


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int | None = None) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour.
    precision = share of fake points inside the real manifold (are the samples realistic?);
    recall = share of real points inside the fake manifold (do the samples cover the data?).
    """
    real, fake = _check(real_features, fake_features, least=k + 1)
    real, fake = real.float(), fake.float()
    return _precision_recall(real, knn_radii(real, k, batch_size), fake, knn_radii(fake, k, batch_size), batch_size)


class Reference:
    """A real feature set prepared once for many comparisons: its mean, covariance and k-NN radii."""

    def __init__(self, features, k: int = 3, batch_size: int | None = None, radii: torch.Tensor | None = None):
        """`radii`: these features' k-NN radii, where they were made before (a saved reference)."""
        self.features = _as_tensor(features, torch.float32)
        self.k, self.batch_size = k, batch_size
        self.mean, self.cov = _mean_cov(self.features.double())
        self._radii = None if radii is None else radii.to(self.features)

    @property
    def radii(self) -> torch.Tensor:
        if self._radii is None:  # only precision/recall need them, and they cost a pass over all pairs
            self._radii = knn_radii(self.features, self.k, self.batch_size)
        return self._radii

    def frechet_distance(self, fake) -> float:
        fake, _ = _check(fake, self.features, least=2)
        return _frechet(*_mean_cov(fake.to(self.features.device)), self.mean, self.cov)

    def precision_recall(self, fake) -> dict:
        fake, _ = _check(fake, self.features, least=self.k + 1)
        fake = fake.float().to(self.features.device)
        return _precision_recall(self.features, self.radii, fake, knn_radii(fake, self.k, self.batch_size),
                                 self.batch_size)

    def distances(self, fake) -> dict:
        """Frechet distance, precision and recall of a fake feature set against this one."""
        return {"frechet_distance": self.frechet_distance(fake), **self.precision_recall(fake)}
