"""The percentile bootstrap against scipy.stats.bootstrap."""

import numpy as np
import pytest
from scipy import stats

from llmcxr_jax.eval import bootstrap


@pytest.mark.parametrize("statistic", [np.mean, np.median])
def test_interval_matches_scipy_percentile_bootstrap(statistic):
    x = np.random.default_rng(1).gamma(2.0, 1.0, 150)
    ours = bootstrap.percentile_interval(lambda idx: statistic(x[idx]), len(x),
                                         resamples=4000, seed=0)
    ref = stats.bootstrap((x,), statistic, n_resamples=4000, method="percentile",
                          confidence_level=0.95, random_state=0).confidence_interval
    width = ref.high - ref.low
    # Independent resamples: the endpoints agree to Monte Carlo error (a few % of the width).
    assert abs(ours[0] - ref.low) < 0.06 * width and abs(ours[1] - ref.high) < 0.06 * width
    assert ours[0] < statistic(x) < ours[1]


def test_fixed_seed_undefined_resamples_and_two_arrays():
    y = np.array([0, 1] * 10)
    s = np.linspace(0, 1, 20)
    stat = lambda idx: float(np.corrcoef(y[idx], s[idx])[0, 1])  # noqa: E731
    assert bootstrap.ci95(stat, 20) == bootstrap.ci95(stat, 20)
    assert bootstrap.ci95(stat, 20, seed=1) != bootstrap.ci95(stat, 20)
    # Undefined on every resample: no interval rather than a made-up one.
    assert bootstrap.ci95(lambda idx: float("nan"), 20) is None


def test_text_intervals_equal_resampling_the_texts():
    """BLEU-4 / ROUGE-L intervals from per-pair statistics equal those of recomputing corpus
    BLEU (sacrebleu) and mean ROUGE-L on each resample of the texts themselves."""
    from llmcxr_jax.eval import text_metrics

    rng = np.random.default_rng(3)
    words = ["no", "acute", "effusion", "left", "right", "small", "pleural", "process", "."]
    refs = [" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(30)]
    hyps = [" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(30)]
    rouge = text_metrics.rouge_l(hyps, refs)[1]
    direct = bootstrap.percentile_intervals(
        lambda idx: {"bleu4": text_metrics.corpus_bleu([hyps[i] for i in idx],
                                                       [refs[i] for i in idx]),
                     "rouge_l": float(rouge[idx].mean())}, len(hyps), resamples=200)
    ours = bootstrap.text_intervals(hyps, refs, resamples=200)
    assert set(ours) == set(direct) == {"bleu4", "rouge_l"}
    for key in direct:
        assert ours[key] == pytest.approx(direct[key], abs=1e-12), key
