"""Fréchet distance vs a direct SciPy computation, closed forms, and the classifier features path."""

import numpy as np
import pytest
import scipy.linalg

from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.eval import fid


def _scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's formula: sqrtm of the product, real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    y = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    assert fid.fid_from_features(x, y) == pytest.approx(_scipy_fid(x, y), rel=1e-8)
    s = fid.feature_stats(x)
    assert s.n == 400 and s.sigma.shape == (12, 12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False))


def test_same_set_is_zero_and_shift_adds_squared_norm():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 80))  # fewer samples than dimensions: singular covariance
    assert fid.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    shift = rng.normal(size=80)
    # (rank-deficient covariance: sqrt of rounding-level eigenvalues limits the precision)
    assert fid.fid_from_features(x, x + shift) == pytest.approx(shift @ shift, rel=1e-6)


def test_closed_forms_for_gaussians():
    rng = np.random.default_rng(2)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Diagonal covariances: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # Commuting covariances (same eigenvectors, any rotation): the same formula on the spectra.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-8)
    # Scaled covariance: S2 = c^2 S1 -> tr(S1)(1 - c)^2.
    s = _random_cov(rng, d)
    c = 1.7
    assert fid.frechet_distance(mu1, s, mu1, c * c * s) == pytest.approx(np.trace(s) * (1 - c) ** 2,
                                                                        rel=1e-8)
    # Samples from two Gaussians converge to the population distance.
    n = 20000
    x = rng.multivariate_normal(mu1, np.diag(a), n)
    y = rng.multivariate_normal(mu2, np.diag(b), n)
    assert fid.fid_from_features(x, y) == pytest.approx(expect, rel=0.05)


def test_general_covariances_vs_scipy():
    rng = np.random.default_rng(3)
    s1, s2 = _random_cov(rng, 10), _random_cov(rng, 10)
    mu = np.zeros(10)
    direct = np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert fid.frechet_distance(mu, s1, mu, s2) == pytest.approx(direct, rel=1e-9)


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        fid.feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="equal length"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_classifier_fid_path():
    cfg = clf.ClassifierConfig(widths=(8, 8), groups=4, image_size=32)
    params = clf.init_params(cfg, 0)
    rng = np.random.default_rng(4)
    a = rng.uniform(-1, 1, (10, 32, 32, 3)).astype(np.float32)
    b = np.clip(a + 0.5, -1, 1)
    same = fid.classifier_fid(cfg, params, a, a, batch_size=8)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["n1"] == 10
    assert same["feature_dim"] == cfg.feature_dim
    feats = clf.extract_features(cfg, params, np.concatenate([a, b]), batch_size=8)
    other = fid.classifier_fid(cfg, params, a, b, batch_size=8)
    assert other["fid"] == pytest.approx(_scipy_fid(feats[:10].astype(np.float64),
                                                    feats[10:].astype(np.float64)), rel=1e-4)
    assert other["fid"] > 0
