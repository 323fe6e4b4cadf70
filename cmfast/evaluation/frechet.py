"""The Frechet distance between two Gaussians fitted to features (the math behind FID), and reference statistics
saved as .npz.

FID (Heusel et al. 2017): d^2 = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), with mu, S the mean and the
(N - 1)-normalised covariance of each set's features.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from ..io import atomic_write_bytes

STATS_FORMAT = "cmfast-feature-stats"


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), both float64; the covariance divides by N - 1."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2 to fit a Gaussian, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2): a symmetric
    PSD matrix with the same eigenvalues as S1 S2, so no complex parts or failed square-root iterations on the
    singular covariances that come from fewer samples than feature dimensions.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1 or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def save_statistics(path: str | os.PathLike, features: np.ndarray, **meta) -> None:
    """Write mu, sigma and the features themselves (KID and precision/recall need them) to a .npz, atomically.
    `meta` (JSON-serialisable: feature space, dataset, split, ...) is stored beside them."""
    mu, sigma = gaussian_statistics(features)
    buf = io.BytesIO()
    header = json.dumps({"format": STATS_FORMAT, **meta})
    np.savez(buf, mu=mu, sigma=sigma, features=np.asarray(features, np.float32), meta=np.array(header))
    atomic_write_bytes(path, buf.getvalue())


def is_statistics_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a .npz holding reference statistics (keys mu and sigma) rather than images."""
    if not os.fspath(path).lower().endswith(".npz") or not os.path.isfile(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {"mu", "sigma"} <= set(npz.files)
    except (OSError, ValueError, EOFError):  # an empty or truncated file: let the dataset loader say what it is
        return False


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """(mu, sigma, features or None, meta) from a .npz written by `save_statistics`, or any .npz with mu and sigma
    (e.g. pytorch-fid's or torch-fidelity's saved statistics)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not {"mu", "sigma"} <= set(npz.files):
                raise ValueError(f"{path}: no reference statistics (needs arrays mu and sigma), found {npz.files}")
            mu, sigma = npz["mu"], npz["sigma"]
            features = npz["features"] if "features" in npz.files else None
            meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma, features, meta
