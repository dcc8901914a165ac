"""Fréchet distance between two sets of image features (FID when the features are Inception's).

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

with the feature means and (unbiased, ddof=1) covariances, as pytorch-fid and the original TTUR
code compute them. The trace of the matrix square root is computed in float64 from symmetric
eigendecompositions: S_1 S_2 is similar to S_1^{1/2} S_2 S_1^{1/2}, which is symmetric positive
semi-definite, so tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(S_1^{1/2} S_2 S_1^{1/2})). Unlike
`scipy.linalg.sqrtm(S_1 @ S_2)` this never goes complex or needs an epsilon on the diagonal when
the covariances are singular (fewer samples than feature dimensions); tiny negative eigenvalues
from rounding are clipped to zero. The tests check it against the scipy computation and against
closed forms.

Features: the project's CXR classifier (`classifier.extract_features`, the default in the
phantom world). Inception-v3 features (the usual FID) are not built in: no Inception weights
ship with the project and none can be downloaded here; any `(params, images) -> [B, F]` feature
function a user brings (e.g. an Inception port with local weights) plugs into
`fid_from_images` the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from llmcxr_jax.eval import classifier as clf


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Mean [F] and covariance [F, F] (float64) of `n` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def feature_stats(features: Any) -> FeatureStats:
    """Mean and unbiased covariance of features [N, F] (N >= 2)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return FeatureStats(x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]),
                        int(x.shape[0]))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (negative rounding noise clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^{1/2}) for symmetric PSD matrices."""
    r = _psd_sqrt(np.asarray(sigma1, np.float64))
    m = r @ np.asarray(sigma2, np.float64) @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """The squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (what 'FID' is)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    f = mu1.shape[0]
    if sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"covariances must be [{f}, {f}], got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(d, 0.0))


def fid_from_features(features1: Any, features2: Any) -> float:
    """Fréchet distance between two feature sets [N1, F] and [N2, F]."""
    a, b = feature_stats(features1), feature_stats(features2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid_from_images(images1: np.ndarray, images2: np.ndarray,
                    features: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """FID of two image sets (NHWC in [-1, 1]) under a host feature function images -> [N, F]."""
    f1, f2 = features(images1), features(images2)
    return {"fid": fid_from_features(f1, f2), "n1": int(f1.shape[0]), "n2": int(f2.shape[0]),
            "feature_dim": int(f1.shape[1])}


def classifier_fid(config: clf.ClassifierConfig, params: Any, images1: np.ndarray,
                   images2: np.ndarray, batch_size: int = 64) -> dict[str, Any]:
    """FID in the CXR classifier's feature space ([B, 2 * widths[-1]] pooled features)."""
    out = fid_from_images(images1, images2,
                          lambda x: clf.extract_features(config, params, x, batch_size))
    return {**out, "features": "cxr_classifier"}
