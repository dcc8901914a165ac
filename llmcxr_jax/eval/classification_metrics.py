"""Multi-label classification metrics: AUROC, F1, Jaccard (micro / macro / weighted), per finding.

Definitions follow scikit-learn (the tests compare against it):

- AUROC of one label is the Mann-Whitney statistic with average ranks for ties, which equals the
  trapezoidal area under the ROC curve that `sklearn.metrics.roc_auc_score` computes (a tie
  between a positive and a negative score counts 1/2).
- micro: the metric over all (sample, label) cells pooled; macro: the unweighted mean over labels;
  weighted: the mean over labels weighted by support (number of positives of the label in
  `y_true`); samples (F1 / Jaccard only): the mean over samples of the per-sample metric.
- AUROC is undefined for a label whose `y_true` holds a single class. Such labels are left out of
  the macro and weighted AUROC (scikit-learn raises instead) and listed in `skipped`; micro AUROC
  pools every cell of every label, as scikit-learn does.
- F1 and Jaccard use `zero_division` (default 0.0, scikit-learn's default value) where the
  denominator is zero (no positives in truth or prediction).

Inputs: `y_true` binary {0, 1} [N, L]; `y_score` real scores [N, L] (probabilities or binary
predictions: AUROC of binary predictions is what an image -> report evaluation gets when the
labeler's output is the prediction). `binarize_chexpert` turns CheXpert label values
(1 / 0 / -1 / blank) into binary truth with a policy for uncertain and blank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

AVERAGES = ("micro", "macro", "weighted")
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
BLANK_POLICIES = ("zeros", "ignore")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _as_2d(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [samples, labels] (or 1-D for one label), got shape "
                         f"{arr.shape}")
    return arr


def _check(y_true: Any, y_score: Any, score_name: str = "y_score") -> tuple[np.ndarray, np.ndarray]:
    t = _as_2d(y_true, "y_true")
    s = _as_2d(y_score, score_name)
    if t.shape != s.shape:
        raise ValueError(f"y_true {t.shape} and {score_name} {s.shape} must have the same shape")
    if t.shape[0] == 0:
        raise ValueError("no samples (y_true is empty)")
    if not np.isin(t, (0.0, 1.0)).all():
        bad = np.unique(t[~np.isin(t, (0.0, 1.0))])[:5]
        raise ValueError(f"y_true must be binary 0/1 (see binarize_chexpert); found {bad.tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"{score_name} contains NaN or inf")
    return t, s


def binarize_chexpert(labels: Any, uncertain: str = "ones", blank: str = "zeros"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert values (1, 0, -1, NaN = blank / not mentioned) -> (binary y [N, L], valid mask).

    `uncertain`: 'ones' (-1 -> 1), 'zeros' (-1 -> 0) or 'ignore' (masked out); `blank`: 'zeros'
    (not mentioned = absent, the usual reading) or 'ignore'. Masked cells get y = 0 and valid =
    False; callers that need complete rows drop them (`valid.all(1)`).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy {uncertain!r} not in {UNCERTAIN_POLICIES}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy {blank!r} not in {BLANK_POLICIES}")
    x = _as_2d(labels, "labels")
    known = np.isnan(x) | np.isin(x, (1.0, 0.0, -1.0))
    if not known.all():
        raise ValueError(f"CheXpert labels must be 1, 0, -1 or blank; found "
                         f"{np.unique(x[~known])[:5].tolist()}")
    y = (x == 1.0).astype(np.float64)
    valid = np.ones(x.shape, bool)
    if uncertain == "ones":
        y[x == -1.0] = 1.0
    elif uncertain == "ignore":
        valid &= x != -1.0
    if blank == "ignore":
        valid &= ~np.isnan(x)
    return y, valid


# --------------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------------


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array with ties given their average rank (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Boundaries of runs of equal values.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def binary_auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """AUROC of one label; NaN when `y_true` holds a single class."""
    y_true = np.asarray(y_true, np.float64).ravel()
    y_score = np.asarray(y_score, np.float64).ravel()
    n_pos = float(y_true.sum())
    n_neg = float(y_true.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(y_score)
    u = ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclasses.dataclass(frozen=True)
class AurocResult:
    micro: float
    macro: float
    weighted: float
    per_label: tuple[float, ...]  # NaN for skipped labels
    skipped: tuple[int, ...]  # label indices with a single class in y_true

    def as_dict(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        names = _names(names, len(self.per_label))
        return {"micro": self.micro, "macro": self.macro, "weighted": self.weighted,
                "per_label": dict(zip(names, self.per_label)),
                "skipped": [names[i] for i in self.skipped]}


def auroc(y_true: Any, y_score: Any) -> AurocResult:
    """Multi-label AUROC: micro (pooled cells), macro and weighted over labels with both classes."""
    t, s = _check(y_true, y_score)
    per = np.array([binary_auroc(t[:, j], s[:, j]) for j in range(t.shape[1])])
    ok = ~np.isnan(per)
    skipped = tuple(int(j) for j in np.flatnonzero(~ok))
    micro = binary_auroc(t.ravel(), s.ravel())
    if ok.any():
        macro = float(per[ok].mean())
        support = t[:, ok].sum(0)
        weighted = float((per[ok] * support).sum() / support.sum())
    else:
        macro = weighted = math.nan
    return AurocResult(micro, macro, weighted, tuple(float(v) for v in per), skipped)


# --------------------------------------------------------------------------------------------------
# F1 and Jaccard
# --------------------------------------------------------------------------------------------------


def predict(y_score: Any, threshold: float | Sequence[float] = 0.5) -> np.ndarray:
    """Binary predictions `score >= threshold` (a scalar or one threshold per label)."""
    s = _as_2d(y_score, "y_score")
    th = np.asarray(threshold, np.float64)
    if th.ndim == 1 and th.shape[0] != s.shape[1]:
        raise ValueError(f"{th.shape[0]} thresholds for {s.shape[1]} labels")
    if th.ndim > 1:
        raise ValueError(f"threshold must be a scalar or one per label, got shape {th.shape}")
    return (s >= th).astype(np.float64)


def _counts(t: np.ndarray, p: np.ndarray, axis: int | None) -> tuple[np.ndarray, ...]:
    tp = (t * p).sum(axis)
    fp = ((1 - t) * p).sum(axis)
    fn = (t * (1 - p)).sum(axis)
    return tp, fp, fn


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), zero_division)


def _f1(tp, fp, fn, zero_division: float) -> np.ndarray:
    # F1 = 2tp / (2tp + fp + fn); ill-defined (no positives in truth nor prediction) -> zero_division.
    return _ratio(2 * tp, 2 * tp + fp + fn, zero_division)


def _jaccard(tp, fp, fn, zero_division: float) -> np.ndarray:
    return _ratio(tp, tp + fp + fn, zero_division)


@dataclasses.dataclass(frozen=True)
class SetScoreResult:
    """F1 or Jaccard: averages, per-label values, and precision / recall per label."""

    micro: float
    macro: float
    weighted: float
    samples: float
    per_label: tuple[float, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]

    def as_dict(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        names = _names(names, len(self.per_label))
        return {"micro": self.micro, "macro": self.macro, "weighted": self.weighted,
                "samples": self.samples, "per_label": dict(zip(names, self.per_label))}


def _set_score(y_true: Any, y_pred: Any, fn_score, zero_division: float) -> SetScoreResult:
    t, p = _check(y_true, y_pred, "y_pred")
    if not np.isin(p, (0.0, 1.0)).all():
        raise ValueError("y_pred must be binary 0/1 (threshold scores with `predict`)")
    tp, fp, fn = _counts(t, p, 0)
    per = fn_score(tp, fp, fn, zero_division)
    micro = float(fn_score(*(c.sum() for c in (tp, fp, fn)), zero_division))
    support = t.sum(0)
    weighted = float((per * support).sum() / support.sum()) if support.sum() > 0 else zero_division
    samples = float(fn_score(*_counts(t, p, 1), zero_division).mean())
    precision = _ratio(tp, tp + fp, zero_division)
    recall = _ratio(tp, tp + fn, zero_division)
    return SetScoreResult(micro, float(per.mean()), weighted, samples,
                          tuple(float(v) for v in per), tuple(float(v) for v in precision),
                          tuple(float(v) for v in recall))


def f1(y_true: Any, y_pred: Any, zero_division: float = 0.0) -> SetScoreResult:
    """F1 of binary predictions (micro / macro / weighted / samples, per label)."""
    return _set_score(y_true, y_pred, _f1, zero_division)


def jaccard(y_true: Any, y_pred: Any, zero_division: float = 0.0) -> SetScoreResult:
    """Jaccard index tp / (tp + fp + fn) of binary predictions (micro / macro / weighted / samples)."""
    return _set_score(y_true, y_pred, _jaccard, zero_division)


def best_f1_thresholds(y_true: Any, y_score: Any, default: float = 0.5) -> np.ndarray:
    """Per-label threshold maximising that label's F1 (predict `score >= threshold`), chosen among
    the label's observed scores, the lowest on ties; `default` for a label without positives.
    Tune on a validation split, never on the split being reported."""
    t, s = _check(y_true, y_score)
    out = np.full(t.shape[1], float(default))
    for j in range(t.shape[1]):
        pos = t[:, j].sum()
        if pos == 0:
            continue
        order = np.argsort(-s[:, j], kind="mergesort")
        scores, labels = s[order, j], t[order, j]
        tp = np.cumsum(labels)
        fp = np.cumsum(1 - labels)
        last = np.r_[scores[1:] != scores[:-1], True]  # thresholds between distinct scores
        f1s = np.where(last, 2 * tp / (tp + fp + pos), -1.0)
        best = np.flatnonzero(f1s == f1s.max())[-1]  # the lowest threshold reaching the best F1
        out[j] = scores[best]
    return out


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def _names(names: Sequence[str] | None, n: int) -> list[str]:
    if names is None:
        return [f"label_{j}" for j in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} label names for {n} labels")
    return list(names)


def finite_or_none(x: Any) -> Any:
    """NaN / inf -> None, recursively, so the result is valid (strict) JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def evaluate(y_true: Any, y_score: Any, names: Sequence[str] | None = None,
             threshold: float | Sequence[float] = 0.5, with_jaccard: bool = False
             ) -> dict[str, Any]:
    """The full multi-label report as a JSON-ready dict (NaN -> None).

    Keys: n (samples), auroc {micro, macro, weighted, per_label, skipped}, f1 {micro, macro,
    weighted, samples, per_label}, (jaccard {...}), per_finding {name: {auroc, f1, precision,
    recall, positives, predicted}}.
    """
    t, s = _check(y_true, y_score)
    names = _names(names, t.shape[1])
    p = predict(s, threshold)
    a, f = auroc(t, s), f1(t, p)
    out: dict[str, Any] = {"n": int(t.shape[0]), "auroc": a.as_dict(names), "f1": f.as_dict(names)}
    if with_jaccard:
        out["jaccard"] = jaccard(t, p).as_dict(names)
    out["per_finding"] = {
        name: {"auroc": a.per_label[j], "f1": f.per_label[j], "precision": f.precision[j],
               "recall": f.recall[j], "positives": int(t[:, j].sum()),
               "predicted": int(p[:, j].sum())}
        for j, name in enumerate(names)}
    return finite_or_none(out)


def fmt(v: Any) -> str:
    """3 decimals, or n/a for an undefined (None/NaN) metric."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of `evaluate` output: one row per finding, then the averages."""
    lines = ["| finding | positives | AUROC | F1 | precision | recall |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["per_finding"].items():
        lines.append(f"| {name} | {r['positives']} | {fmt(r['auroc'])} | {fmt(r['f1'])} | "
                     f"{fmt(r['precision'])} | {fmt(r['recall'])} |")
    for avg in AVERAGES:
        lines.append(f"| **{avg}** | | {fmt(result['auroc'][avg])} | {fmt(result['f1'][avg])} | | |")
    if result["auroc"]["skipped"]:
        lines.append("")
        lines.append(f"AUROC skipped (single class in y_true): {', '.join(result['auroc']['skipped'])}")
    return "\n".join(lines)
