"""Data pipeline throughput against what the train step consumes.

    python bench/data.py            # phantom world of 200 studies, tiny + pythia-70m settings
    python bench/data.py --quick    # smoke run (small world, few batches)

For each model preset (tiny: a 2,048-id BPE trained on the world's text, seq 1024; pythia-70m: the
GPT-NeoX-20B tokenizer, seq 2048) it runs the full pipeline (tokenise, mix 40/40/20, pack, batch)
on a phantom world and reports examples/s and tokens/s, by wall clock and by this process's CPU
time (the machine is shared, so wall-clock rates are a lower bound; the pipeline runs in one
thread with `read_threads=0`). Beside it: the train step's consumption in tokens/s, measured in the
same run with `llmcxr_jax.train.step` on one device, on batches of the same pipeline settings, for
the presets in `--measure-train` (default: tiny). The pipeline/train ratio is given only where the
step was measured; a preset whose step is not measured has no ratio (there is no assumed rate),
and a step that fails to run fails the benchmark. Real (non-padding) tokens on both sides,
counted outside the timed loops; each pipeline rate is the median of three timings. Also:
padding with and without packing, grain ReadOptions thread counts, and the PyTorch/transformers
reference data path of the original (HF tokenizer + DataCollatorForLanguageModeling(
pad_to_multiple_of=8), one example per row, padded to the longest in the batch) as a ratio.
Image codes are random (throughput does not depend on their values). The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import numpy as np

from llmcxr_jax.configs import DataConfig, TrainConfig
from llmcxr_jax.data import mimic
from llmcxr_jax.data import pipeline as P
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import Vocab, gpt_neox_20b_dir, load_vocab

PRESETS = {"tiny": dict(seq_len=1024, vocab="bpe"), "pythia-70m": dict(seq_len=2048, vocab="neox")}


def make_world(out: pathlib.Path, n_studies: int) -> pathlib.Path:
    from llmcxr_jax.data.phantom_world import WorldConfig, write_world

    write_world(out, WorldConfig(n_studies=n_studies, size=32, seed=0,
                                 n_instructions=max(50, 4 * n_studies)),
                workers=1, progress=False)
    return out


def world_texts(world: pathlib.Path) -> list[str]:
    texts = [p.read_text() for p in (world / "reports").rglob("*.txt")]
    for name in ("instructions.jsonl", "vqa.jsonl"):
        for line in (world / name).read_text().splitlines():
            rec = json.loads(line)
            texts += [str(v) for k, v in rec.items() if k in ("instruction", "context", "response",
                                                             "question", "answer")]
    return texts


def get_vocab(kind: str, world: pathlib.Path) -> Vocab:
    if kind == "neox":
        return load_vocab(gpt_neox_20b_dir())
    from llmcxr_jax.text.bpe import train_bpe

    return train_bpe(world_texts(world), vocab_size=2048)


def run_pipeline(sources: P.Sources, vocab: Vocab, cfg: DataConfig, train_cfg: TrainConfig,
                 batches: int, repeats: int = 3) -> dict:
    """Throughput of `batches` batches after one warm-up batch: the median (by wall time) of
    `repeats` consecutive timings of the same iterator, its batches counted after the clock
    stops."""
    pipe = P.build_pipeline(sources, vocab, cfg, seq_len=train_cfg.seq_len,
                            global_batch=train_cfg.global_batch, shard_index=0, shard_count=1)
    it = iter(pipe)
    next(it)
    timings = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        segments = [next(it)["segment_ids"] for _ in range(batches)]
        timings.append((time.perf_counter() - wall, time.process_time() - cpu, segments))
    wall, cpu, segments = sorted(timings, key=lambda t: t[0])[len(timings) // 2]
    examples = sum(len(np.unique(r[r > 0])) for seg in segments for r in seg)
    tokens = sum(int((seg > 0).sum()) for seg in segments)
    slots = sum(seg.size for seg in segments)
    seg = segments[-1]
    return {"examples_per_s": examples / wall, "tokens_per_s": tokens / wall,
            "examples_per_cpu_s": examples / cpu, "tokens_per_cpu_s": tokens / cpu,
            "padding_fraction": 1 - tokens / slots, "examples_per_row": examples / (batches *
                                                                                   seg.shape[0]),
            "drops": pipe.drops.as_dict()}


def run_reference(sources: P.Sources, vocab: Vocab, cfg: DataConfig, train_cfg: TrainConfig,
                  batches: int) -> dict:
    """The original's data path in PyTorch/transformers: format the Dolly text, tokenise with the
    HF tokenizer, splice the image ids over the placeholder, collate with
    DataCollatorForLanguageModeling(pad_to_multiple_of=8) and mask the labels up to the response
    key (as LLM-CXR's DataCollatorForCompletionOnlyLM), one example per row."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    tok = vocab.to_transformers()
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False, return_tensors="pt",
                                               pad_to_multiple_of=8)
    placeholder = tok(prompts.IMAGE_PLACEHOLDER, add_special_tokens=False)["input_ids"]
    weights = cfg.task_weights()
    rng = np.random.default_rng(0)
    tasks = list(weights)
    probs = np.array([weights[t] for t in tasks])
    b_size = train_cfg.global_batch

    def example(task: str, rec: dict) -> list[int] | None:
        if task == "instruct":
            text = prompts.format_prompt(rec["instruction"], rec["context"] or None, rec["response"])
        elif task == "report2image":
            text = prompts.format_prompt(prompts.pick_instruction(
                prompts.REPORT_TO_IMAGE_INSTRUCTIONS, rng), rec["report"], prompts.IMAGE_PLACEHOLDER)
        elif task == "image2report":
            text = prompts.format_prompt(prompts.pick_instruction(
                prompts.IMAGE_TO_REPORT_INSTRUCTIONS, rng), prompts.IMAGE_PLACEHOLDER, rec["report"])
        else:
            text = prompts.format_prompt(rec["question"], prompts.IMAGE_PLACEHOLDER, rec["answer"])
        ids = tok(text, max_length=train_cfg.seq_len, truncation=True)["input_ids"]
        if "codes" in rec:
            n = len(placeholder)
            at = next((i for i in range(len(ids) - n + 1) if ids[i:i + n] == placeholder), None)
            if at is None:
                return None
            ids = ids[:at] + (np.asarray(rec["codes"], np.int64) + vocab.n_text).tolist() + ids[at + n:]
        return ids if len(ids) < train_cfg.seq_len else None

    response_id = vocab.response_id
    examples = tokens = slots = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        rows = []
        while len(rows) < b_size:
            task = tasks[int(rng.choice(len(tasks), p=probs))]
            recs = sources.records[task]
            ids = example(task, recs[int(rng.integers(len(recs)))])
            if ids is not None:
                rows.append({"input_ids": ids})
        batch = collator(rows)
        labels = batch["labels"].clone()
        for i in range(labels.shape[0]):
            where = torch.nonzero(batch["input_ids"][i] == response_id)
            labels[i, :int(where[0, 0]) + 1] = -100
        examples += b_size
        tokens += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"examples_per_s": examples / wall, "tokens_per_s": tokens / wall,
            "examples_per_cpu_s": examples / cpu, "tokens_per_cpu_s": tokens / cpu,
            "padding_fraction": 1 - tokens / slots}


def measure_train_step(preset: str, vocab: Vocab, sources: P.Sources, cfg: DataConfig,
                       train_cfg: TrainConfig, steps: int) -> float:
    """Tokens/s (real tokens, not padding) of the project's train step on one device, on `steps`
    batches of the pipeline under `cfg` and `train_cfg`'s shape (fetched before the clock
    starts), after one compile step."""
    import jax

    from llmcxr_jax.configs import model_preset
    from llmcxr_jax.train.state import init_state
    from llmcxr_jax.train.step import make_train_step

    model_cfg = model_preset(preset, vocab_size=vocab.embed_rows,
                             max_position_embeddings=max(train_cfg.seq_len, 1024))
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])
    state = init_state(model_cfg, train_cfg, mesh)
    step = make_train_step(model_cfg, train_cfg, mesh, num_tasks=len(P.TASKS))
    it = P.build_pipeline(sources, vocab, cfg, seq_len=train_cfg.seq_len,
                          global_batch=train_cfg.global_batch, shard_index=0,
                          shard_count=1).global_iterator(mesh)
    batches = [next(it) for _ in range(steps + 1)]
    tokens = sum(int(np.asarray(b["segment_ids"] > 0).sum()) for b in batches[1:])
    state, metrics = step(state, batches[0])  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for b in batches[1:]:
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    return tokens / (time.perf_counter() - start)


def _round(value: float | None, digits: int | None) -> float | None:
    return None if value is None else round(value, digits)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small world, few batches")
    ap.add_argument("--world", default="", help="an existing phantom/MIMIC world (default: make one)")
    ap.add_argument("--studies", type=int, default=200, help="studies in the generated world")
    ap.add_argument("--batches", type=int, default=40, help="batches timed per setting")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows) of the pipeline")
    ap.add_argument("--measure-train", default="tiny",
                    help="comma-separated presets whose train step is measured in this run "
                         "(default: tiny; the others get no pipeline/train ratio)")
    ap.add_argument("--train-steps", type=int, default=3, help="timed train steps per preset")
    args = ap.parse_args(argv)
    if args.quick:
        args.studies, args.batches, args.train_steps = 16, 6, 1
    measure = [p for p in args.measure_train.split(",") if p]
    unknown = sorted(set(measure) - set(PRESETS))
    if unknown:
        ap.error(f"--measure-train: unknown preset(s) {unknown}; known: {sorted(PRESETS)}")

    with tempfile.TemporaryDirectory() as tmp:
        world = pathlib.Path(args.world) if args.world else make_world(
            pathlib.Path(tmp) / "world", args.studies)
        split = mimic.read_split(world, SkipCounter())
        codes = {d: np.random.default_rng(i).integers(0, 1024, 256).astype(np.uint16)
                 for i, d in enumerate(sorted(split))}
        base = DataConfig(world=str(world), instructions=str(world / "instructions.jsonl"),
                          vqa=str(world / "vqa.jsonl"))
        sources = P.load_sources(base, codes=codes)

        results: dict = {"world_studies": len({(r.subject_id, r.study_id) for r in split.values()}),
                         "records": sources.sizes(), "presets": {}}
        rows = []
        for preset, spec in PRESETS.items():
            vocab = get_vocab(spec["vocab"], world)
            train_cfg = TrainConfig(global_batch=args.batch, seq_len=spec["seq_len"])
            packed = run_pipeline(sources, vocab, base, train_cfg, args.batches)
            unpacked = run_pipeline(sources, vocab, dataclasses.replace(base, packing=False),
                                    train_cfg, args.batches)
            ref = run_reference(sources, vocab, base, train_cfg, args.batches)
            train_tps = ratio = None
            if preset in measure:
                train_tps = measure_train_step(preset, vocab, sources, base, train_cfg,
                                               args.train_steps)
                ratio = packed["tokens_per_s"] / train_tps
            results["presets"][preset] = {
                "seq_len": spec["seq_len"], "vocab": f"{spec['vocab']} ({vocab.n_text} text ids)",
                "packed": packed, "unpacked": unpacked, "reference": ref,
                "train_tokens_per_s": train_tps, "pipeline_over_train": ratio,
                "pipeline_over_reference_cpu": packed["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]}
            rows.append((preset, packed, unpacked, ref, train_tps, ratio))

        threads = {}
        if not args.quick:
            vocab = get_vocab("bpe", world)
            train_cfg = TrainConfig(global_batch=args.batch, seq_len=1024)
            for n in (0, 2, 8):
                r = run_pipeline(sources, vocab, dataclasses.replace(base, read_threads=n),
                                 train_cfg, args.batches)
                threads[n] = round(r["tokens_per_s"])
            results["read_threads_tokens_per_s"] = threads

    print(f"\nphantom world: {results['world_studies']} studies; records {results['records']}; "
          f"global batch {args.batch}")
    print(f"{'preset':<11} {'path':<24} {'ex/s':>7} {'tok/s':>9} {'tok/cpu-s':>10} "
          f"{'ex/row':>6} {'padding':>8}")
    for preset, packed, unpacked, ref, *_ in rows:
        for name, r in (("pipeline (packed)", packed), ("pipeline (unpacked)", unpacked),
                        ("torch reference", ref)):
            print(f"{preset:<11} {name:<24} {r['examples_per_s']:>7.0f} {r['tokens_per_s']:>9.0f} "
                  f"{r['tokens_per_cpu_s']:>10.0f} {r.get('examples_per_row', 1.0):>6.2f} "
                  f"{r['padding_fraction']:>8.3f}")
    print(f"\n{'preset':<11} {'pipeline tok/s':>15} {'train step tok/s':>17} {'ratio':>6}  "
          f"target >= 5 (train step measured in this run, one device)")
    for preset, packed, _, _, train_tps, ratio in rows:
        step = "not measured" if train_tps is None else f"{train_tps:.0f}"
        print(f"{preset:<11} {packed['tokens_per_s']:>15.0f} {step:>17} "
              f"{'-' if ratio is None else f'{ratio:.1f}':>6}")
    if threads:
        print("read_threads -> tokens/s (tiny, packed): " +
              ", ".join(f"{k}: {v}" for k, v in threads.items()))
    summary = {"bench": "data", "quick": args.quick, **{
        f"{p}_{k}": v for p, r in results["presets"].items() for k, v in (
            ("pipeline_tokens_per_s", round(r["packed"]["tokens_per_s"])),
            ("pipeline_examples_per_s", round(r["packed"]["examples_per_s"])),
            ("pipeline_tokens_per_cpu_s", round(r["packed"]["tokens_per_cpu_s"])),
            ("train_tokens_per_s", _round(r["train_tokens_per_s"], None)),
            ("pipeline_over_train", _round(r["pipeline_over_train"], 1)),
            ("padding_packed", round(r["packed"]["padding_fraction"], 3)),
            ("padding_unpacked", round(r["unpacked"]["padding_fraction"], 3)),
            ("padding_reference", round(r["reference"]["padding_fraction"], 3)),
            ("over_reference_cpu", round(r["pipeline_over_reference_cpu"], 2)))},
        "read_threads_tokens_per_s": threads}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
