"""Report labeler: speed on one core and agreement, against a keyword-and-negation baseline.

    python bench/labeler.py            # 4,000 reports; generation timed with the tiny model
    python bench/labeler.py --quick    # smoke run (400 reports, no generation)

Reports: phantom-world reports (FINDINGS + IMPRESSION, with ground-truth labels) and the
real-style test sentences (`tests/data/labeler_real_style_sentences.jsonl`) assembled five to a
report under a FINDINGS header. Both labelers run on the same reports, interleaved in rounds,
pinned to one CPU core; the table gives reports/s by wall clock and by this process's CPU time.
Our labeler classifies each distinct sentence once (report sets repeat theirs); its cache is
emptied before every round, and a second line times it on distinct sentences only, none repeated.

The reference is the plain labeler real-report studies compare against: CheXpert's mention
phrases (the package's copy) matched as substrings, a mention negative when a negation word is
among the six words before it in its sentence, uncertain when a hedge word is, aggregated as
CheXpert does. Agreement: per-label F1 with positive = 1 or -1, macro over the labels present,
on the phantom ground truth and on the real-style sentences' expected labels.

Time share: `launch/evaluate.py`'s image -> report step for a 3,530-image test set labels the
generated and the reference reports twice each (the scores, then the bootstrap intervals), so
4 x 3,530 label calls, beside generating 3,530 reports (batches of 16, the phantom default's tiny
model and a BPE trained here, as many new tokens as the reference reports' FINDINGS + IMPRESSION
have) and BLEU / ROUGE.
Generation is timed on one batch after compilation and scaled to the test set; random weights
rarely stop early, so every row runs to the token budget. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import statistics
import sys
import time

import numpy as np

from llmcxr_jax.data import chexpert_phrases, labeler

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_STYLE = REPO / "tests" / "data" / "labeler_real_style_sentences.jsonl"
TEST_SET = 3530
EVAL_BATCH = 16  # launch/evaluate.py's default --batch-size
SECTION = "findings+impression"  # launch/evaluate.py's labeler section

# ---------------------------------------------------------------------------------------------
# The reference: keywords and a negation window
# ---------------------------------------------------------------------------------------------

_NEGATIONS = {"no", "not", "without", "negative", "free", "resolved", "removed", "absent",
              "normal", "unremarkable", "clear"}
_HEDGES = {"possible", "possibly", "may", "might", "could", "likely", "probable", "probably",
           "suspicious", "suspected", "questionable", "versus", "vs", "exclude", "borderline",
           "concerning", "cannot"}
_WINDOW = 6


def keyword_labeler():
    """A keyword-and-negation labeler over CheXpert's mention phrases (substring match)."""
    phrases = [(obs, re.compile(re.escape(p.replace("_", " "))))
               for obs, ps in chexpert_phrases.load("mention").items() for p in ps]

    def label(report: str) -> dict[str, labeler.Label]:
        out: dict[str, labeler.Label] = {name: None for name in labeler.LABELS}
        rank = {1.0: 2, -1.0: 1, 0.0: 0}
        other = False
        text = labeler.select_text(report, SECTION).lower()
        sentences = [s for s in re.split(r"[.\n]+", text) if s.strip()]
        for sentence in sentences:
            for obs, rx in phrases:
                for m in rx.finditer(sentence):
                    before = set(re.findall(r"[a-z]+", sentence[:m.start()])[-_WINDOW:])
                    value = 0.0 if before & _NEGATIONS else -1.0 if before & _HEDGES else 1.0
                    if obs == labeler.NO_FINDING:  # the list of other abnormalities
                        other |= value != 0.0
                        continue
                    if out[obs] is None or rank[value] > rank[out[obs]]:
                        out[obs] = value
        abnormal = other or any(out[n] in (1.0, -1.0) for n in labeler.LABELS
                                if n not in (labeler.NO_FINDING, labeler.SUPPORT_DEVICES))
        out[labeler.NO_FINDING] = 1.0 if sentences and not abnormal else None
        return out

    return label


# ---------------------------------------------------------------------------------------------
# Reports and agreement
# ---------------------------------------------------------------------------------------------

def phantom_reports(n: int) -> list[tuple[str, dict]]:
    """(report, ground-truth labels) of `n` phantom studies."""
    from llmcxr_jax.data import phantom_world

    cfg = phantom_world.WorldConfig(n_studies=n, seed=0)
    out = []
    for plan in phantom_world.plan_world(cfg):
        sf = phantom_world.study_findings(cfg, plan)
        labels = {k: (None if v is None else float(v)) for k, v in sf.labels().items()}
        out.append((phantom_world.study_report(cfg, plan, sf), labels))
    return out


def real_style_items() -> list[tuple[str, dict]]:
    """(text, expected labels) of the real-style sentences that need no labeler options."""
    items = []
    for line in REAL_STYLE.read_text().splitlines():
        rec = json.loads(line)
        if not rec.get("options"):
            labels = {n: (None if rec["labels"].get(n) is None else float(rec["labels"][n]))
                      for n in labeler.LABELS}
            items.append((rec["text"], labels))
    return items


def assembled_reports(sentences: list[str], n: int, per_report: int = 5) -> list[str]:
    """`n` reports of `per_report` real-style sentences each (cycling through them)."""
    rng = np.random.default_rng(0)
    return ["FINDINGS: " + " ".join(sentences[i] for i in
                                    rng.choice(len(sentences), per_report, replace=False))
            for _ in range(n)]


def macro_f1(truth: list[dict], pred: list[dict]) -> tuple[float, dict[str, float]]:
    """Per-label F1 with positive = 1 or -1, and their mean over labels present in `truth`."""
    from sklearn.metrics import f1_score

    per = {}
    for name in labeler.LABELS:
        y = [t[name] in (1.0, -1.0) for t in truth]
        if any(y):
            per[name] = float(f1_score(y, [p[name] in (1.0, -1.0) for p in pred]))
    return float(np.mean(list(per.values()))), per


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_labelers(fns: dict, reports: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Items/s (wall and CPU) of each labeler, interleaved in `rounds`, median over rounds; our
    labeler's sentence cache is emptied before each of its rounds."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            labeler._sentence_mentions.cache_clear()
            wall, cpu = time.perf_counter(), time.process_time()
            for r in reports:
                fn(r)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: {"wall_rps": len(reports) / statistics.median(w for w, _ in t),
                   "cpu_rps": len(reports) / statistics.median(c for _, c in t)}
            for name, t in times.items()}


def generation_seconds_per_batch(reference_reports: list[str], seed: int = 0) -> tuple[float, int]:
    """Seconds for one batch of image -> report generation with the phantom default's tiny model
    (random weights, a BPE trained on the reports), as many new tokens as the mean reference."""
    import jax

    from llmcxr_jax.configs import model_preset
    from llmcxr_jax.llm import inference
    from llmcxr_jax.llm.model import init_params
    from llmcxr_jax.text.bpe import train_bpe

    vocab = train_bpe(reference_reports, vocab_size=2048)
    config = model_preset("tiny")
    params = init_params(config, jax.random.PRNGKey(seed))
    n_tokens = int(np.mean([len(vocab.encode(labeler.select_text(r, SECTION)))
                            for r in reference_reports[:500]]))
    gen = dataclasses.replace(inference.REPORT_SAMPLING, max_new_tokens=n_tokens)
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, vocab.n_image, 64) for _ in range(EVAL_BATCH)]

    def once(i: int) -> float:
        start = time.perf_counter()
        inference.reports_from_images(params, config, vocab, codes, jax.random.key(i), gen)
        return time.perf_counter() - start

    once(0)  # compile
    return statistics.median(once(i) for i in range(1, 4)), n_tokens


def text_metric_seconds(gen: list[str], ref: list[str]) -> float:
    from llmcxr_jax.eval import text_metrics

    start = time.perf_counter()
    text_metrics.report_metrics(gen, ref)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 reports, no generation")
    parser.add_argument("--phantom", type=int, default=3000, help="phantom reports")
    parser.add_argument("--assembled", type=int, default=1000,
                        help="reports assembled from the real-style sentences")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per labeler")
    args = parser.parse_args(argv)
    if args.quick:
        args.phantom, args.assembled, args.rounds = 300, 100, 1

    phantom = phantom_reports(args.phantom)
    real = real_style_items()
    reports = [r for r, _ in phantom] + assembled_reports([t for t, _ in real], args.assembled)
    ours = lambda r: labeler.label_report(r, SECTION)  # noqa: E731
    reference = keyword_labeler()

    distinct = sorted({s for r in reports
                       for s in labeler.split_sentences(labeler.select_text(r, SECTION))})
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # one core for both labelers
    try:
        speed = time_labelers({"ours": ours, "keyword baseline": reference}, reports, args.rounds)
        speed["ours, distinct sentences"] = time_labelers(
            {"ours": labeler.label_text}, distinct, args.rounds)["ours"]
    finally:
        os.sched_setaffinity(0, cpus)

    agreement = {}
    for set_name, items in (("phantom ground truth", phantom), ("real-style sentences", real)):
        truth = [labels for _, labels in items]
        texts = [t if set_name.startswith("phantom") else "FINDINGS: " + t for t, _ in items]
        agreement[set_name] = {name: macro_f1(truth, [fn(t) for t in texts])
                               for name, fn in (("ours", ours), ("keyword baseline", reference))}

    print(f"{len(reports)} reports ({len(phantom)} phantom, {args.assembled} assembled from "
          f"{len(real)} real-style sentences; {len(distinct)} distinct sentences), section "
          f"{SECTION}, one core, {args.rounds} rounds")
    print(f"{'labeler':26s} {'items/s wall':>13s} {'items/s CPU':>12s} "
          + " ".join(f"{'macro F1 ' + s:>30s}" for s in agreement))
    for name in speed:
        f1 = [agreement[s][name][0] if name in agreement[s] else float("nan") for s in agreement]
        print(f"{name:26s} {speed[name]['wall_rps']:13.0f} {speed[name]['cpu_rps']:12.0f} "
              + " ".join(f"{v:30.3f}" for v in f1))
    for s, by in agreement.items():
        print(f"per-label F1 on {s} (ours / baseline): " + ", ".join(
            f"{k} {v:.2f}/{by['keyword baseline'][1].get(k, float('nan')):.2f}"
            for k, v in by["ours"][1].items()))

    result = {"bench": "labeler", "n_reports": len(reports),
              "ours_reports_per_s": round(speed["ours"]["wall_rps"], 1),
              "ours_cpu_reports_per_s": round(speed["ours"]["cpu_rps"], 1),
              "baseline_reports_per_s": round(speed["keyword baseline"]["wall_rps"], 1),
              "ours_over_baseline_speed": round(speed["ours"]["wall_rps"]
                                                / speed["keyword baseline"]["wall_rps"], 3),
              "ours_distinct_sentences_per_s": round(
                  speed["ours, distinct sentences"]["wall_rps"], 1)}
    for s, by in agreement.items():
        key = "phantom" if s.startswith("phantom") else "real_style"
        result[f"macro_f1_{key}_ours"] = round(by["ours"][0], 4)
        result[f"macro_f1_{key}_baseline"] = round(by["keyword baseline"][0], 4)

    if not args.quick:
        refs = [r for r, _ in phantom]
        label_s = 4 * TEST_SET / speed["ours"]["wall_rps"]
        batch_s, n_tokens = generation_seconds_per_batch(refs)
        gen_s = batch_s * -(-TEST_SET // EVAL_BATCH)
        pairs = [refs[i % len(refs)] for i in range(TEST_SET)]
        text_s = text_metric_seconds(pairs[1:] + pairs[:1], pairs)
        total = label_s + gen_s + text_s
        print(f"\nimage -> report step of launch/evaluate.py, {TEST_SET} images:")
        print(f"{'part':44s} {'seconds':>9s} {'share':>7s}")
        for part, sec in ((f"generation (tiny model, batch {EVAL_BATCH}, {n_tokens} tokens)",
                           gen_s), ("labelling (4 x 3,530 reports)", label_s),
                          ("BLEU / ROUGE", text_s)):
            print(f"{part:44s} {sec:9.1f} {sec / total:7.1%}")
        result.update({"eval_label_s": round(label_s, 2), "eval_generation_s": round(gen_s, 1),
                       "eval_text_metrics_s": round(text_s, 2),
                       "label_share_of_image2report": round(label_s / total, 4)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
