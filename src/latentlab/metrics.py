"""Sample-quality metrics in a feature space: Frechet distance and k-NN precision/recall.

Both take (N, F) feature arrays, here the penultimate activations of the project's digit classifier, so the
numbers are comparable only between sets embedded by the same classifier (always report the floors beside them).

BLAS runs on one thread here: OpenBLAS threads spin while they wait, and on a shared 2-core machine that made
these (and sklearn's Gaussian mixtures) over ten times slower than one thread.
"""
import numpy as np
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits


def one_blas_thread():
    """`with one_blas_thread():` runs numpy/scipy/sklearn linear algebra on a single thread, then restores."""
    return threadpool_limits(limits=1, user_api="blas")


def _check(a: np.ndarray, b: np.ndarray, least: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, F) feature arrays of the same F, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < least:
        raise ValueError(f"need at least {least} samples in each set, got {len(a)} and {len(b)}")
    return a, b


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues from rounding -> 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula, Heusel et al. 2017):

        ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2)

    tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, which is
    symmetric PSD: real and stable where scipy.linalg.sqrtm of the non-symmetric product can turn complex.
    """
    a, b = _check(features_a, features_b, least=2)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    with one_blas_thread():
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root_a = _sqrt_psd(cov_a)
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return float(max(distance, 0.0))


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point of the same set."""
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    return distances[:, k]  # column 0 is the point itself


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     batch_size: int = 1000) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour.
    precision = share of fake points inside the real manifold (are the samples realistic?);
    recall = share of real points inside the fake manifold (do the samples cover the data?).
    """
    real, fake = _check(real_features, fake_features, least=k + 1)
    fake_inside = np.zeros(len(fake), dtype=bool)
    real_inside = np.zeros(len(real), dtype=bool)
    with one_blas_thread():
        real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
        for start in range(0, len(fake), batch_size):  # (batch, N_real) distances at a time: bounded memory
            distances = pairwise_distances(fake[start:start + batch_size], real)
            fake_inside[start:start + batch_size] = (distances <= real_radii[None, :]).any(axis=1)
            real_inside |= (distances <= fake_radii[start:start + batch_size, None]).any(axis=0)
    return {"precision": float(fake_inside.mean()), "recall": float(real_inside.mean())}
