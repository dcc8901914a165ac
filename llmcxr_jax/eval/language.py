"""Language retention: does the fine-tuned model still follow plain text instructions?

Held-out instructions are the project's procedural ones (`data/procedural_instructions.py`),
drawn with a seed the training world did not use and with every (instruction, context) pair that
occurs in the training instructions removed. Two numbers per model:

- perplexity of the reference response (response tokens through `### End`, the prompt only
  conditions; `eval/perplexity.py`),
- exact-match accuracy of a greedy answer (`procedural_instructions.check`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.data import procedural_instructions
from llmcxr_jax.eval.perplexity import perplexity
from llmcxr_jax.llm import inference
from llmcxr_jax.llm.generate import GenerationConfig
from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import Vocab

ANSWER_TOKENS = 48  # the longest procedural answer (a sorted list of 8 numbers) fits
HELDOUT_SEED_OFFSET = 7919  # added to the world's seed: a seed the training data never used


def training_pairs(path: str | pathlib.Path | None) -> set[tuple[str, str]]:
    """(instruction, context) pairs of a training JSONL (dolly format); empty without a file."""
    if not path:
        return set()
    path = pathlib.Path(path)
    if not path.is_file():
        return set()
    pairs = set()
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            pairs.add((str(r["instruction"]), str(r.get("context") or "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a malformed training line cannot leak into the held-out set
    return pairs


def heldout_instructions(n: int, seed: int, exclude: set[tuple[str, str]]) -> list[dict]:
    """`n` procedural records from `seed`, none of whose (instruction, context) is in `exclude`,
    and no two alike."""
    if n < 1:
        raise ValueError(f"need at least one held-out instruction, got n={n}")
    out: list[dict] = []
    seen = set(exclude)
    pool = 4 * n
    for attempt in range(6):
        for r in procedural_instructions.generate(pool, seed + attempt * 1_000_003):
            key = (r["instruction"], r["context"])
            if key not in seen:
                seen.add(key)
                out.append(r)
                if len(out) == n:
                    return out
    raise ValueError(f"could draw only {len(out)} held-out instructions not in the training set "
                     f"(wanted {n})")


def example_bucket(examples: Sequence[Any], multiple: int = 64) -> int:
    """The padded length for perplexity batches: the longest input (ids[:-1]) rounded up."""
    return -(-max(len(e.ids) - 1 for e in examples) // multiple) * multiple


def _batched(items: Sequence[Any], batch_size: int):
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        yield start, chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shapes


def answers(params: Any, config: ModelConfig, vocab: Vocab, records: Sequence[dict],
            rng: jax.Array, batch_size: int, max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """Greedy answers to each record's instruction (and context), in fixed-size batches."""
    longest = max(len(prompts.instruction_prompt_ids(vocab, r["instruction"], r["context"] or None))
                  for r in records)
    # Every prompt padded to one length: one compilation for all batches.
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                           length_multiple=-(-longest // 64) * 64)
    out: list[str] = []
    for start, chunk in _batched(records, batch_size):
        texts = inference.follow_instructions(
            params, config, vocab, [r["instruction"] for r in chunk],
            [r["context"] or None for r in chunk], jax.random.fold_in(rng, start), gen)
        out.extend(texts[:min(batch_size, len(records) - start)])
    return out


def retention(params: Any, config: ModelConfig, vocab: Vocab, records: Sequence[dict],
              rng: jax.Array, batch_size: int = 8, source: str = "",
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """{n, perplexity, accuracy, ...} of one model on the held-out records."""
    examples = [prompts.instruction_example(vocab, r["instruction"], r["context"] or None,
                                            r["response"]) for r in records]
    # One padded length for every batch (the longest example's, rounded up): one compilation.
    ppl = perplexity(config, params, examples, batch_size=batch_size,
                     bucket=example_bucket(examples))
    generated = answers(params, config, vocab, records, rng, batch_size)
    correct = [procedural_instructions.check(r, g) for r, g in zip(records, generated)]
    say(f"language ({source}): perplexity {ppl['perplexity']:.2f}, exact match "
        f"{sum(correct)}/{len(correct)}")
    return {"source": source, "n": len(records), "perplexity": ppl["perplexity"],
            "nll_per_token": ppl["nll_per_token"], "token_accuracy": ppl["token_accuracy"],
            "response_tokens": ppl["tokens"], "perplexity_n": ppl["examples"],
            "perplexity_skipped": ppl["skipped"],
            "accuracy": float(np.mean(correct)), "correct": int(sum(correct)),
            "samples": [{"instruction": r["instruction"], "context": r["context"],
                         "reference": r["response"], "generated": g, "correct": c}
                        for r, g, c in list(zip(records, generated, correct))[:8]]}
