"""Percentile bootstrap intervals over test items.

`ci95(statistic, n)` resamples the n item indices with replacement (`resamples` times, a fixed
seed), evaluates `statistic(indices)` on each resample and returns the 2.5th and 97.5th
percentiles of the values. The statistic takes indices, not values, so one helper serves
statistics of several aligned arrays (labels and scores, hypotheses and references). Resamples
on which the statistic is undefined (NaN, e.g. an AUROC whose resample holds one class) are left
out; if fewer than half remain the interval is None. Helpers below give the intervals of the
evaluation's headline numbers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

RESAMPLES = 1_000
SEED = 0


def percentile_intervals(statistics: Callable[[np.ndarray], Mapping[str, float]], n: int, *,
                         level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED
                         ) -> dict[str, list[float] | None]:
    """name -> [lo, hi]: the `level` percentile bootstrap interval of each named statistic over
    n items; `statistics(indices)` evaluates them all on one resample."""
    if n < 1 or resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n >= 1 ({n}), resamples >= 1 ({resamples}), 0 < level < 1 "
                         f"({level})")
    rng = np.random.default_rng(seed)
    draws = [statistics(rng.integers(0, n, n)) for _ in range(resamples)]
    tail = 100 * (1 - level) / 2
    out: dict[str, list[float] | None] = {}
    for name in draws[0]:
        values = np.array([d[name] for d in draws], np.float64)
        values = values[np.isfinite(values)]
        if 2 * values.size < resamples:
            out[name] = None
            continue
        lo, hi = np.percentile(values, [tail, 100 - tail])
        out[name] = [float(lo), float(hi)]
    return out


def percentile_interval(statistic: Callable[[np.ndarray], float], n: int, **kwargs
                        ) -> list[float] | None:
    """[lo, hi] of one statistic (see `percentile_intervals`)."""
    return percentile_intervals(lambda idx: {"value": statistic(idx)}, n, **kwargs)["value"]


def ci95(statistic: Callable[[np.ndarray], float], n: int, **kwargs) -> list[float] | None:
    """The 95 % percentile bootstrap interval of one statistic."""
    return percentile_interval(statistic, n, level=0.95, **kwargs)


def multilabel_intervals(y_true: Any, y_score: Any, threshold: Any = 0.5, **kwargs
                         ) -> dict[str, list[float] | None]:
    """95 % intervals of macro / micro AUROC and F1 (`classification_metrics`, predictions
    `score >= threshold`) of binary truth and scores [N, L] over the N items."""
    from llmcxr_jax.eval import classification_metrics as metrics

    y, s = np.asarray(y_true, np.float64), np.asarray(y_score, np.float64)
    pred = metrics.predict(s, threshold)

    def stats(idx: np.ndarray) -> dict[str, float]:
        a, f = metrics.auroc(y[idx], s[idx]), metrics.f1(y[idx], pred[idx])
        return {"auroc_macro": a.macro, "auroc_micro": a.micro, "f1_macro": f.macro,
                "f1_micro": f.micro}

    return percentile_intervals(stats, len(y), **kwargs)


def text_intervals(hypotheses: Sequence[str], references: Sequence[str], **kwargs
                   ) -> dict[str, list[float] | None]:
    """95 % intervals of corpus BLEU-4 and mean ROUGE-L (`text_metrics`) over the pairs."""
    from llmcxr_jax.eval import text_metrics

    hyps, refs = list(hypotheses), list(references)
    per_pair_rouge = text_metrics.rouge_l(hyps, refs)[1]
    # Corpus BLEU of a resample from the summed per-pair statistics: no re-tokenising per draw.
    per_pair_bleu = text_metrics.bleu_statistics(hyps, refs)

    def stats(idx: np.ndarray) -> dict[str, float]:
        return {"bleu4": text_metrics.bleu_from_statistics(per_pair_bleu[idx].sum(0)),
                "rouge_l": float(per_pair_rouge[idx].mean())}

    return percentile_intervals(stats, len(hyps), **kwargs)
