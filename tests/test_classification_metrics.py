"""Classification metrics against scikit-learn on random and tie-heavy multi-label data."""

import math

import numpy as np
import pytest

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from llmcxr_jax.eval import classification_metrics as cm  # noqa: E402


def _data(seed: int, n: int = 200, labels: int = 6, ties: bool = False):
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.05, 0.6, labels)
    y = (rng.random((n, labels)) < prevalence).astype(np.float64)
    if ties:  # few distinct score values: many positive/negative ties
        s = rng.integers(0, 4, (n, labels)) / 3.0
        s = np.where(y == 1, np.minimum(s + (rng.random((n, labels)) < 0.4) / 3.0, 1.0), s)
    else:
        s = np.clip(y * 0.3 + rng.random((n, labels)) * 0.8, 0, 1)
    return y, s


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True), (3, False)])
def test_auroc_matches_sklearn(seed, ties):
    y, s = _data(seed, ties=ties)
    r = cm.auroc(y, s)
    assert r.skipped == ()
    for j in range(y.shape[1]):
        assert r.per_label[j] == pytest.approx(sklearn_metrics.roc_auc_score(y[:, j], s[:, j]),
                                               abs=1e-12)
    for avg in cm.AVERAGES:
        assert getattr(r, avg) == pytest.approx(
            sklearn_metrics.roc_auc_score(y, s, average=avg), abs=1e-12), avg


def test_auroc_binary_predictions_and_hand_example():
    # Scores 0/1 only (what the labeler gives): all ties are resolved as 1/2.
    y = np.array([1, 1, 0, 0, 0], float)
    p = np.array([1, 0, 1, 0, 0], float)
    # (positive, negative) pairs: the positive scored 1 vs negatives (1, 0, 0) -> 0.5 + 1 + 1;
    # the positive scored 0 vs the same -> 0 + 0.5 + 0.5; six pairs.
    assert cm.binary_auroc(y, p) == pytest.approx((2.5 + 1.0) / 6)
    assert cm.binary_auroc(y, p) == pytest.approx(sklearn_metrics.roc_auc_score(y, p))


def test_auroc_skips_single_class_labels():
    y, s = _data(4)
    y[:, 2] = 0.0  # no positives
    y[:, 4] = 1.0  # no negatives
    r = cm.auroc(y, s)
    assert r.skipped == (2, 4)
    assert math.isnan(r.per_label[2]) and math.isnan(r.per_label[4])
    keep = [0, 1, 3, 5]
    for avg in ("macro", "weighted"):
        assert getattr(r, avg) == pytest.approx(
            sklearn_metrics.roc_auc_score(y[:, keep], s[:, keep], average=avg), abs=1e-12)
    assert r.micro == pytest.approx(sklearn_metrics.roc_auc_score(y, s, average="micro"), abs=1e-12)
    d = cm.evaluate(y, s, names=list("abcdef"))
    assert d["auroc"]["skipped"] == ["c", "e"] and d["per_finding"]["c"]["auroc"] is None


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (5, False)])
def test_f1_and_jaccard_match_sklearn(seed, ties):
    y, s = _data(seed, ties=ties)
    y[:, 1] = 0.0  # a label without positives: zero_division applies in per-label / macro
    p = cm.predict(s, 0.5)
    p[:3] = 0.0
    y[:3] = 0.0  # samples with nothing true and nothing predicted
    f, jac = cm.f1(y, p), cm.jaccard(y, p)
    for avg in ("micro", "macro", "weighted", "samples"):
        assert getattr(f, avg) == pytest.approx(
            sklearn_metrics.f1_score(y, p, average=avg, zero_division=0.0), abs=1e-12), avg
        assert getattr(jac, avg) == pytest.approx(
            sklearn_metrics.jaccard_score(y, p, average=avg, zero_division=0.0), abs=1e-12), avg
    np.testing.assert_allclose(f.per_label, sklearn_metrics.f1_score(y, p, average=None,
                                                                      zero_division=0.0))
    np.testing.assert_allclose(f.precision, sklearn_metrics.precision_score(
        y, p, average=None, zero_division=0.0))
    np.testing.assert_allclose(f.recall, sklearn_metrics.recall_score(
        y, p, average=None, zero_division=0.0))


def test_per_label_thresholds_and_hand_f1():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], float)
    s = np.array([[0.9, 0.2], [0.4, 0.35], [0.6, 0.3], [0.1, 0.1]])
    p = cm.predict(s, [0.5, 0.25])
    np.testing.assert_array_equal(p, [[1, 0], [0, 1], [1, 1], [0, 0]])
    f = cm.f1(y, p)
    # label 0: tp1 fp1 fn1 -> 0.5; label 1: tp2 fp0 fn0 -> 1.0; micro: tp3 fp1 fn1 -> 6/8
    assert f.per_label == pytest.approx((0.5, 1.0))
    assert f.micro == pytest.approx(0.75) and f.macro == pytest.approx(0.75)
    with pytest.raises(ValueError, match="3 thresholds for 2 labels"):
        cm.predict(s, [0.5, 0.5, 0.5])


def test_binarize_chexpert_policies():
    x = np.array([[1, 0, -1, np.nan]], float)
    y, v = cm.binarize_chexpert(x, "ones", "zeros")
    np.testing.assert_array_equal(y, [[1, 0, 1, 0]]) and np.testing.assert_array_equal(v, [[1] * 4])
    y, v = cm.binarize_chexpert(x, "zeros", "ignore")
    np.testing.assert_array_equal(y, [[1, 0, 0, 0]])
    np.testing.assert_array_equal(v, [[True, True, True, False]])
    y, v = cm.binarize_chexpert(x, "ignore", "zeros")
    np.testing.assert_array_equal(v, [[True, True, False, True]])
    with pytest.raises(ValueError, match="1, 0, -1 or blank"):
        cm.binarize_chexpert([[2.0]])
    with pytest.raises(ValueError, match="uncertain policy"):
        cm.binarize_chexpert(x, "maybe")


def test_errors_and_table():
    with pytest.raises(ValueError, match="binary 0/1"):
        cm.auroc([[0.5]], [[0.5]])
    with pytest.raises(ValueError, match="same shape"):
        cm.auroc(np.zeros((3, 2)), np.zeros((3, 1)))
    y, s = _data(7, n=50, labels=3)
    table = cm.markdown_table(cm.evaluate(y, s, names=["a", "b", "c"]))
    assert table.count("\n") == 2 + 3 + 3 - 1 and "| **macro** |" in table


def test_best_f1_thresholds_vs_brute_force():
    y, s = _data(8, n=80, labels=4, ties=True)
    y[:, 3] = 0.0
    th = cm.best_f1_thresholds(y, s)
    assert th[3] == 0.5
    for j in range(3):
        best = max(sklearn_metrics.f1_score(y[:, j], s[:, j] >= c) for c in np.unique(s[:, j]))
        assert sklearn_metrics.f1_score(y[:, j], s[:, j] >= th[j]) == pytest.approx(best)
        assert th[j] in s[:, j]
