"""The single-finding probes (eval/probes.py) against scikit-learn on the subset filtered here by
hand: the groups of items with exactly one, no or any finding (uncertain counted as positive, No
Finding aside), each group's AUROC / F1 / Jaccard on the findings with both classes in it, its
per-finding counts, its bootstrap intervals and its false-alarm share."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, roc_auc_score

from llmcxr_jax.eval import bootstrap, probes

NAMES = ("No Finding", "Cardiomegaly", "Edema", "Pleural Effusion", "Support Devices")
N = 60


def _study_labels(rng: np.random.Generator) -> np.ndarray:
    """CheXpert values [N, 5]: 1 / 0 / -1 / blank, No Finding 1 when nothing else is 1 or -1."""
    values = rng.choice([1.0, 0.0, -1.0, np.nan], size=(N, len(NAMES)), p=[0.2, 0.2, 0.1, 0.5])
    # Most studies with few findings, so every group is populated.
    sparse = rng.random(N) < 0.6
    values[sparse, 1:] = np.where(rng.random((sparse.sum(), len(NAMES) - 1)) < 0.8, np.nan,
                                  values[sparse, 1:])
    found = np.isin(values[:, 1:], (1.0, -1.0)).any(1)
    values[:, 0] = np.where(found, np.nan, 1.0)
    return values


def _expected(y: np.ndarray, score: np.ndarray, threshold, rows: np.ndarray) -> dict:
    """scikit-learn's averages on the rows, over the columns with both classes there."""
    y, score = y[rows], score[rows]
    keep = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    th = np.broadcast_to(np.asarray(threshold, float), (y.shape[1],))
    pred = (score >= th).astype(int)[:, keep]
    y, score = y[:, keep], score[:, keep]
    return {"keep": keep, "auroc": {a: roc_auc_score(y, score, average=a) for a in ("macro",
                                                                                      "micro")},
            "f1": {a: f1_score(y, pred, average=a, zero_division=0) for a in ("macro", "micro")},
            "jaccard": {a: jaccard_score(y, pred, average=a, zero_division=0)
                        for a in ("macro", "micro")}}


def test_groups_and_their_metrics_equal_scikit_learn_on_the_filtered_items():
    rng = np.random.default_rng(0)
    values = _study_labels(rng)
    finding_cols = [1, 2, 3, 4]
    positive = np.isin(values[:, finding_cols], (1.0, -1.0))  # U-ones, No Finding aside
    rows = {"single_finding": positive.sum(1) == 1, "no_finding": positive.sum(1) == 0,
            "any_finding": positive.sum(1) >= 1}
    assert all(r.sum() >= 8 for r in rows.values())
    truth = np.isin(values, (1.0, -1.0)).astype(float)
    # Report -> image: classifier probabilities that track the truth, per-label thresholds.
    probs = np.clip(0.35 * truth + 0.65 * rng.random(truth.shape), 0, 1)
    thresholds = np.array([0.5, 0.45, 0.55, 0.5, 0.6])
    blocks = probes.probe_blocks(values, NAMES, truth, probs, NAMES, thresholds, seed=3)
    assert list(blocks) == list(probes.GROUPS)
    for group, mask in rows.items():
        block = blocks[group]
        assert block["n"] == mask.sum()
        called = (probs[mask][:, finding_cols] >= thresholds[finding_cols]).any(1)
        assert block["finding_called"] == pytest.approx(called.mean())
        assert block["n_by_finding"] == {
            NAMES[j]: int(positive[mask][:, k].sum())
            for k, j in enumerate(finding_cols) if positive[mask][:, k].any()}
        if group == "no_finding":  # no positives: nothing to score, said so
            assert "not_measured" in block and "auroc" not in block
            continue
        want = _expected(truth, probs, thresholds, mask)
        assert block["findings"] == [NAMES[j] for j in want["keep"]]
        for metric in ("auroc", "f1"):
            for avg in ("macro", "micro"):
                assert block[metric][avg] == pytest.approx(want[metric][avg]), (group, metric, avg)
        keep = want["keep"]
        assert block["ci95"] == bootstrap.multilabel_intervals(
            truth[mask][:, keep], probs[mask][:, keep], thresholds[keep], seed=3)
    # In the single-finding group No Finding is all negative, so it is never scored, and each
    # item counts under its one finding.
    single = blocks["single_finding"]
    assert "No Finding" in single["excluded"]
    assert sum(single["n_by_finding"].values()) == single["n"]

    # Image -> report: the labeler's own 14-label truth and 1 / 0.5 / 0 scores, grouped by the
    # same study labels over the classifier's names.
    report_truth = np.concatenate([truth, (rng.random((N, 2)) < 0.3).astype(float)], axis=1)
    report_scores = rng.choice([0.0, 0.5, 1.0], size=report_truth.shape)
    report_names = NAMES + ("Pneumonia", "Fracture")
    i2r = probes.probe_blocks(values, NAMES, report_truth, report_scores, report_names, 0.5,
                              with_jaccard=True)
    mask = rows["single_finding"]
    want = _expected(report_truth, report_scores, 0.5, mask)
    block = i2r["single_finding"]
    assert block["n"] == mask.sum()
    for metric in ("auroc", "f1", "jaccard"):
        for avg in ("macro", "micro"):
            assert block[metric][avg] == pytest.approx(want[metric][avg]), (metric, avg)
    called = (report_scores[mask][:, 1:] >= 0.5).any(1)  # every name but No Finding
    assert block["finding_called"] == pytest.approx(called.mean())


def test_a_group_of_one_item_says_why_it_is_not_measured():
    values = np.array([[np.nan, 1.0, 0.0], [1.0, np.nan, np.nan], [np.nan, 1.0, -1.0]])
    names = ("No Finding", "Edema", "Pleural Effusion")
    truth = np.isin(values, (1.0, -1.0)).astype(float)
    blocks = probes.probe_blocks(values, names, truth, truth, names)
    assert blocks["single_finding"]["n"] == 1 and "need >= 2" in \
        blocks["single_finding"]["not_measured"]
    assert blocks["any_finding"]["n"] == 2  # the uncertain effusion makes the third item double
    assert blocks["no_finding"]["finding_called"] == 0.0
