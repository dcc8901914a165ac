"""Label agreement for the two directions of the paper's protocol, with chance levels beside.

- report -> image: a CXR classifier's probabilities on generated images against the CheXpert labels
  of the reports that produced them (`image_alignment`).
- image -> report: the report labeler on generated and on reference reports (`report_agreement`).

Labels are binarised as the classifier was trained: uncertain (-1) counts as positive (U-ones; in
the phantom world an uncertain finding is drawn subtly) and blank (not mentioned) as negative. Only
findings with both classes in the truth are scored (AUROC is undefined otherwise and F1 of a
finding absent from every reference rewards nothing); the others are listed under `excluded`.

Chance levels (`chance_levels`): AUROC 0.5, and the F1 of a predictor that calls each finding
positive at random with that finding's prevalence p_j. From expected counts (TP = N p_j^2,
FP = FN = N p_j (1 - p_j)) its F1 is p_j per finding, mean(p) macro and sum(p^2) / sum(p) micro
and support-weighted. The F1 of calling every finding positive, 2 p_j / (1 + p_j) per finding, is
given too (`f1_all_positive`): it is the higher of the two baselines for rare findings.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from llmcxr_jax.data import labeler
from llmcxr_jax.eval import bootstrap
from llmcxr_jax.eval import classification_metrics as metrics

# A labeler value as a score for AUROC: positive 1, uncertain 0.5, negative or not mentioned 0.
LABEL_SCORE = {1.0: 1.0, -1.0: 0.5, 0.0: 0.0}


def label_matrix(labels: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """CheXpert values [N, L] (1 / 0 / -1, NaN for not mentioned) from label dicts."""
    out = np.full((len(labels), len(names)), np.nan)
    for i, row in enumerate(labels):
        for j, name in enumerate(names):
            v = row.get(name)
            if v is not None:
                out[i, j] = float(v)
    return out


def binarize(values: np.ndarray) -> np.ndarray:
    """U-ones, blank = 0: binary truth [N, L] from CheXpert values."""
    return metrics.binarize_chexpert(values, uncertain="ones", blank="zeros")[0]


def label_scores(values: np.ndarray) -> np.ndarray:
    """Scores [N, L] of labeler output for AUROC (1 / 0.5 / 0, see `LABEL_SCORE`)."""
    v = np.asarray(values, np.float64)
    return np.where(v == 1.0, 1.0, np.where(v == -1.0, 0.5, 0.0))


def informative(y_true: np.ndarray) -> np.ndarray:
    """Indices of the labels whose truth holds both classes."""
    y = np.asarray(y_true)
    pos = y.sum(0)
    return np.flatnonzero((pos > 0) & (pos < y.shape[0]))


def chance_levels(y_true: Any, names: Sequence[str]) -> dict[str, Any]:
    """Chance AUROC and F1 (random at prevalence; all-positive) of binary truth [N, L]."""
    y = np.asarray(y_true, np.float64)
    if y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"y_true must be [N, L] with N >= 1, got shape {y.shape}")
    p = y.mean(0)
    all_pos = 2 * p / (1 + p)
    psum = p.sum()
    prevalence = {
        "micro": float((p ** 2).sum() / psum) if psum > 0 else 0.0,
        "macro": float(p.mean()),
        "weighted": float((p ** 2).sum() / psum) if psum > 0 else 0.0,
        "per_label": dict(zip(names, map(float, p))),
    }
    positive = {
        "micro": float(2 * psum / (2 * psum + (1 - p).sum())),
        "macro": float(all_pos.mean()),
        "weighted": float((all_pos * p).sum() / psum) if psum > 0 else 0.0,
        "per_label": dict(zip(names, map(float, all_pos))),
    }
    return {"auroc": 0.5, "f1": prevalence, "f1_all_positive": positive,
            "prevalence": dict(zip(names, map(float, p)))}


def scored_block(y_true: Any, y_score: Any, names: Sequence[str],
                 threshold: float | Sequence[float] = 0.5, with_jaccard: bool = False
                 ) -> dict[str, Any]:
    """`classification_metrics.evaluate` on the findings with both classes, plus chance levels.

    Keys: n, findings (scored), excluded (single-class), auroc, f1, (jaccard), per_finding,
    chance, threshold.
    """
    y = np.asarray(y_true, np.float64)
    s = np.asarray(y_score, np.float64)
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"y_true {y.shape} and y_score {s.shape} must both be [N, L]")
    keep = informative(y)
    if keep.size == 0:
        raise ValueError(f"no finding among {list(names)} has both classes in the {y.shape[0]} "
                         f"test items: nothing to score (a larger --n-test may help)")
    th = np.asarray(threshold, np.float64)
    th_kept = th if th.ndim == 0 else th[keep]
    kept = [names[j] for j in keep]
    out = metrics.evaluate(y[:, keep], s[:, keep], names=kept, threshold=th_kept,
                           with_jaccard=with_jaccard)
    out["findings"] = kept
    out["excluded"] = [n for j, n in enumerate(names) if j not in set(keep.tolist())]
    out["chance"] = chance_levels(y[:, keep], kept)
    out["threshold"] = float(th) if th.ndim == 0 else dict(zip(kept, map(float, th_kept)))
    return out


def scored_intervals(y_true: Any, y_score: Any, threshold: float | Sequence[float] = 0.5,
                     seed: int = bootstrap.SEED) -> dict[str, list[float] | None]:
    """95 % bootstrap intervals over the items (`bootstrap.multilabel_intervals`) of
    `scored_block`'s macro / micro AUROC and F1: the same findings (both classes in the truth)
    and thresholds."""
    y = np.asarray(y_true, np.float64)
    keep = informative(y)
    th = np.asarray(threshold, np.float64)
    return bootstrap.multilabel_intervals(y[:, keep], np.asarray(y_score, np.float64)[:, keep],
                                          th if th.ndim == 0 else th[keep], seed=seed)


def image_alignment(label_values: Any, probabilities: Any, names: Sequence[str],
                    threshold: float | Sequence[float] = 0.5) -> dict[str, Any]:
    """report -> image: classifier probabilities [N, L] vs the reports' CheXpert values [N, L]."""
    return scored_block(binarize(np.asarray(label_values, np.float64)), probabilities, names,
                        threshold)


def report_labels(reports: Sequence[str], section: str, names: Sequence[str]) -> np.ndarray:
    """The labeler's CheXpert values [N, L] (NaN = not mentioned) of each report."""
    return label_matrix(labeler.label_reports(reports, section=section), names)


def report_truth_and_scores(generated: Sequence[str], reference: Sequence[str],
                            section: str = "findings+impression",
                            names: Sequence[str] = labeler.LABELS
                            ) -> tuple[np.ndarray, np.ndarray]:
    """image -> report's (binary truth [N, L] from the references, scores [N, L] of the generated
    reports): the labeler's values, binarised U-ones and scored 1 / 0.5 / 0 (`label_scores`)."""
    if len(generated) != len(reference):
        raise ValueError(f"{len(generated)} generated reports but {len(reference)} references")
    return (binarize(report_labels(reference, section, names)),
            label_scores(report_labels(generated, section, names)))


def report_agreement(generated: Sequence[str], reference: Sequence[str],
                     section: str = "findings+impression",
                     names: Sequence[str] = labeler.LABELS) -> dict[str, Any]:
    """image -> report: labeler(generated) vs labeler(reference): AUROC (scores 1 / 0.5 / 0), F1
    and Jaccard (binary, U-ones), micro / macro / weighted and per finding, with chance levels."""
    y, scores = report_truth_and_scores(generated, reference, section, names)
    # A uncertain mention scores 0.5 for AUROC and counts as positive at the 0.5 threshold.
    out = scored_block(y, scores, names, threshold=0.5, with_jaccard=True)
    out["labeler_section"] = section
    return out
