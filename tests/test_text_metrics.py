"""BLEU / ROUGE-L wrappers vs direct sacrebleu / rouge-score calls and hand-checked values."""

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llmcxr_jax.eval import text_metrics as tm

HYPS = ["No acute cardiopulmonary process.",
        "Small left pleural effusion. Heart size is normal.",
        "Moderate cardiomegaly with mild pulmonary edema.",
        "There is a right upper lobe consolidation, concerning for pneumonia.",
        "Endotracheal tube terminates 4 cm above the carina."]
REFS = ["No acute cardiopulmonary abnormality.",
        "Small left pleural effusion. The heart is normal in size.",
        "Cardiomegaly is moderate. Mild pulmonary edema.",
        "Right upper lobe consolidation concerning for pneumonia.",
        "The endotracheal tube ends 4 cm above the carina. No pneumothorax."]


def test_bleu_matches_sacrebleu_corpus_score():
    # BLEU-4: sacrebleu's top-level function with its defaults.
    assert tm.corpus_bleu(HYPS, REFS) == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [REFS]).score / 100, abs=1e-12)
    for order in (1, 2):
        direct = sacrebleu.metrics.BLEU(max_ngram_order=order).corpus_score(HYPS, [REFS])
        assert tm.corpus_bleu(HYPS, REFS, order) == pytest.approx(direct.score / 100, abs=1e-12)
    # Corpus-level pooling is not the mean of sentence BLEUs.
    sentence_mean = np.mean([sacrebleu.sentence_bleu(h, [r]).score / 100 for h, r in zip(HYPS, REFS)])
    assert tm.corpus_bleu(HYPS, REFS) != pytest.approx(sentence_mean, abs=1e-6)


def test_bleu_hand_checked():
    ref = ["the cat is on the mat"]
    # Unigrams: the, cat, on, the, mat match; "sat" does not -> 5/6, no brevity penalty.
    assert tm.corpus_bleu(["the cat sat on the mat"], ref, 1) == pytest.approx(5 / 6)
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 -> exp smoothing gives 1/(2*3).
    expect = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert tm.corpus_bleu(["the cat sat on the mat"], ref, 4) == pytest.approx(expect)
    # Brevity penalty: 2 of 6 reference words, all matching -> exp(1 - 6/2).
    assert tm.corpus_bleu(["the cat"], ref, 1) == pytest.approx(math.exp(-2))
    assert tm.corpus_bleu(ref, ref, 4) == pytest.approx(1.0)


def test_bleu_tokenisation_and_case():
    # 13a splits punctuation off words, so these are the same token sequence.
    assert tm.corpus_bleu(["No effusion."], ["No effusion ."], 1) == pytest.approx(1.0)
    assert tm.corpus_bleu(["no effusion ."], ["No effusion ."], 1) == pytest.approx(2 / 3)
    assert tm.corpus_bleu(["no effusion ."], ["No effusion ."], 1, lowercase=True) == \
        pytest.approx(1.0)


def test_rouge_l_matches_rouge_score_mean():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    direct = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)]
    mean, per = tm.rouge_l(HYPS, REFS)
    np.testing.assert_allclose(per, direct)
    assert mean == pytest.approx(np.mean(direct))
    # Hand check: LCS "the cat on the mat" = 5 of 6 tokens each side -> F = 5/6.
    assert tm.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"])[0] == pytest.approx(5 / 6)
    # rouge-score lowercases and drops punctuation.
    assert tm.rouge_l(["No effusion."], ["no effusion"])[0] == pytest.approx(1.0)
    # Argument order matters for precision/recall: a short hypothesis has precision 1, recall 2/6.
    assert tm.rouge_l(["the cat"], ["the cat is on the mat"])[0] == pytest.approx(
        2 * 1 * (2 / 6) / (1 + 2 / 6))


def test_report_metrics_and_errors():
    m = tm.report_metrics(HYPS, REFS)
    assert m["n"] == 5 and 0 < m["bleu4"] < m["bleu1"] < 1 and 0 < m["rouge_l"] < 1
    with pytest.raises(ValueError, match="5 hypotheses but 4 references"):
        tm.report_metrics(HYPS, REFS[:4])
    with pytest.raises(ValueError, match="no hypotheses"):
        tm.corpus_bleu([], [])
    # An empty generated report scores 0, not an error.
    assert tm.corpus_bleu([""], ["no effusion"], 1) == 0.0
    assert tm.rouge_l([""], ["no effusion"])[0] == 0.0


def test_bleu_of_a_resample_from_summed_statistics_is_sacrebleus():
    """The bootstrap's BLEU (`bleu_statistics` summed over a resample) equals sacrebleu's corpus
    score of the resampled lists, repeats included, for each n-gram order."""
    rng = np.random.default_rng(0)
    for order in (1, 2, 4):
        stats = tm.bleu_statistics(HYPS, REFS, order)
        assert stats.shape == (len(HYPS), 2 + 2 * order)
        for _ in range(20):
            idx = rng.integers(0, len(HYPS), len(HYPS))
            direct = sacrebleu.metrics.BLEU(max_ngram_order=order).corpus_score(
                [HYPS[i] for i in idx], [[REFS[i] for i in idx]]).score / 100
            assert tm.bleu_from_statistics(stats[idx].sum(0), order) == pytest.approx(
                direct, abs=1e-12)
