"""Report-generation text metrics: corpus BLEU-1 / BLEU-4 (sacrebleu) and ROUGE-L (rouge-score).

What exactly is computed (scores are fractions in [0, 1], not sacrebleu's 0-100):

- BLEU-n is sacrebleu's corpus BLEU with `max_ngram_order=n`: the brevity penalty times the
  geometric mean of the clipped 1..n-gram precisions pooled over the whole corpus (Papineni et al.
  with uniform weights; BLEU-1 = BP x unigram precision). Tokenisation is sacrebleu's default
  '13a' (mteval-v13a: punctuation split off words), case-sensitive unless `lowercase=True`.
  sacrebleu's default 'exp' smoothing only changes an n-gram order with zero matches in the whole
  corpus (a degenerate case; unsmoothed BLEU would be 0 there).
- ROUGE-L is rouge-score's `rougeL` F-measure (LCS over the whole text, beta = 1; its tokeniser
  lowercases and keeps [a-z0-9] runs), computed per (hypothesis, reference) pair and averaged over
  pairs (the macro average, as most report-generation papers do). No stemming unless
  `use_stemmer=True`.

One reference per hypothesis.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("no hypotheses")
    for name, texts in (("hypothesis", hyps), ("reference", refs)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{name} {i} is {type(t).__name__}, not str")
    return hyps, refs


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4,
                lowercase: bool = False, tokenize: str = "13a") -> float:
    """Corpus BLEU with n-grams up to `max_order`, in [0, 1]."""
    hyps, refs = _check(hypotheses, references)
    metric = BLEU(max_ngram_order=max_order, lowercase=lowercase, tokenize=tokenize)
    return float(metric.corpus_score(hyps, [refs]).score) / 100.0


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4
                    ) -> np.ndarray:
    """Per-pair BLEU sufficient statistics [N, 2 + 2 * max_order] (hypothesis and reference
    length, n-gram matches and totals per order): corpus BLEU of any subset or resample of the
    pairs is `bleu_from_statistics` of their sum, as sacrebleu's own paired bootstrap does."""
    hyps, refs = _check(hypotheses, references)
    metric = BLEU(max_ngram_order=max_order)
    return np.asarray(metric._extract_corpus_statistics(hyps, [refs]), np.int64)


def bleu_from_statistics(summed: np.ndarray, max_order: int = 4) -> float:
    """Corpus BLEU in [0, 1] from `bleu_statistics` summed over the pairs."""
    metric = BLEU(max_ngram_order=max_order)
    return float(metric._compute_score_from_stats([int(v) for v in summed]).score) / 100.0


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], use_stemmer: bool = False
            ) -> tuple[float, np.ndarray]:
    """(mean ROUGE-L F-measure, per-pair F-measures [N])."""
    hyps, refs = _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    # rouge-score's argument order is score(target, prediction).
    per = np.array([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])
    return float(per.mean()), per


def report_metrics(hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False,
                   use_stemmer: bool = False) -> dict[str, Any]:
    """{'bleu1', 'bleu4', 'rouge_l', 'n'} of generated reports against reference reports."""
    hyps, refs = _check(hypotheses, references)
    return {"bleu1": corpus_bleu(hyps, refs, 1, lowercase),
            "bleu4": corpus_bleu(hyps, refs, 4, lowercase),
            "rouge_l": rouge_l(hyps, refs, use_stemmer)[0],
            "n": len(hyps),
            "definition": {"bleu": f"sacrebleu corpus BLEU, tokenize=13a, lowercase={lowercase}, "
                                   "score/100",
                           "rouge_l": f"rouge-score rougeL F-measure, mean over pairs, "
                                      f"use_stemmer={use_stemmer}"}}
