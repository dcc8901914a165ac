"""Task-level inference over the jitted generator: image -> report, report -> image codes,
VQA and plain instructions, in batches, with the prompt formats the model was trained on.

Report -> image never retries: the logits-mask hook forces exactly `tokens_per_image` image ids
after `### Response:\\n` and then `### End` (the original samples until it happens to get 256).
With `guidance` S != 1 it decodes each report's unconditional twin (`unconditional_prompt_ids`)
beside it and samples from `uncond + S * (cond - uncond)` (`generate.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm.constraints import LogitsMaskFn, image_then_end_mask
from llmcxr_jax.llm.generate import GenerationConfig, GenerationOutput, generate
from llmcxr_jax.llm.model import Params
from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import Vocab

# The original's report sampling: top_p 0.92, top_k 0, temperature 1; up to 128 new tokens.
REPORT_SAMPLING = GenerationConfig(max_new_tokens=128, do_sample=True, temperature=1.0, top_k=0,
                                   top_p=0.92)
# The original's code sampling: the whole distribution (no top-k / top-p) at temperature 1; a
# run's `image_temperature` replaces the temperature. The length is set per call.
IMAGE_SAMPLING = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch, max_len] ids and mask, each row right-aligned (left padding)."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def unconditional_prompt_ids(vocab: Vocab, phrasing: int | None = 0) -> list[int]:
    """The unconditional twin of a report -> image prompt: `prompts.NULL_REPORT` as the report,
    in the same phrasing (what the model saw at `DataConfig.null_report_rate`)."""
    return prompts.report_to_image_prompt_ids(vocab, prompts.NULL_REPORT, phrasing)


def generate_rows(params: Params, config: ModelConfig, vocab: Vocab,
                  rows: Sequence[Sequence[int]], rng: jax.Array, gen: GenerationConfig,
                  logits_mask_fn: LogitsMaskFn | None = None, *, guidance: float = 1.0,
                  uncond_rows: Sequence[Sequence[int]] | None = None) -> GenerationOutput:
    """Generate after each prompt in `rows` (token id lists) until `### End`; host arrays out.

    `rng` is one key for the batch, or one key per row (`row_keys`): row i then samples from its
    own key, so its tokens do not depend on the other rows. With `guidance` != 1, `uncond_rows`
    are the prompts' unconditional twins.
    """
    ids, mask = left_pad(rows, vocab.pad_id)
    uncond_ids, uncond_mask = left_pad(uncond_rows, vocab.pad_id) if uncond_rows else (None, None)
    gen = dataclasses.replace(gen, stop_ids=(vocab.end_id,), pad_id=vocab.pad_id)
    out = generate(params, config, ids, mask, rng, gen,
                   valid_mask=vocab.valid_token_mask()[:config.vocab_size],
                   logits_mask_fn=logits_mask_fn, guidance=guidance, uncond_ids=uncond_ids,
                   uncond_mask=uncond_mask)
    return jax.tree.map(np.asarray, jax.device_get(out))


def row_keys(seeds: Sequence[int]) -> jax.Array:
    """One PRNG key per row, `jax.random.key(seeds[i])`, for `generate_rows`."""
    return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))


def _text_of(vocab: Vocab, tokens: np.ndarray) -> str:
    """Decoded text up to (not including) `### End`."""
    tokens = list(tokens)
    if vocab.end_id in tokens:
        tokens = tokens[:tokens.index(vocab.end_id)]
    return vocab.decode(tokens).strip()


def reports_from_images(params: Params, config: ModelConfig, vocab: Vocab,
                        codes: Sequence[np.ndarray], rng: jax.Array,
                        gen: GenerationConfig = REPORT_SAMPLING,
                        phrasing: int | None = 0) -> list[str]:
    """image -> report for each image's codes."""
    rows = [prompts.image_to_report_prompt_ids(vocab, c, phrasing) for c in codes]
    tokens = generate_rows(params, config, vocab, rows, rng, gen).tokens
    return [_text_of(vocab, t) for t in tokens]


def images_from_reports(params: Params, config: ModelConfig, vocab: Vocab, reports: Sequence[str],
                        rng: jax.Array, tokens_per_image: int = 256,
                        gen: GenerationConfig = IMAGE_SAMPLING,
                        phrasing: int | None = 0, guidance: float = 1.0) -> np.ndarray:
    """report -> image codes [batch, tokens_per_image]: exactly that many, by construction;
    `guidance` is the classifier-free guidance scale (1 = none)."""
    rows = [prompts.report_to_image_prompt_ids(vocab, r, phrasing) for r in reports]
    twins = [unconditional_prompt_ids(vocab, phrasing)] * len(rows) if guidance != 1.0 else None
    hook = image_then_end_mask(vocab.image_offset, vocab.n_image, vocab.end_id, tokens_per_image)
    gen = dataclasses.replace(gen, max_new_tokens=tokens_per_image + 1)
    tokens = generate_rows(params, config, vocab, rows, rng, gen, hook, guidance=guidance,
                           uncond_rows=twins).tokens
    return np.stack([vocab.codes_from_ids(t[:tokens_per_image], expected=tokens_per_image)
                     for t in tokens])


def answers(params: Params, config: ModelConfig, vocab: Vocab, codes: Sequence[np.ndarray],
            questions: Sequence[str], rng: jax.Array,
            gen: GenerationConfig = REPORT_SAMPLING) -> list[str]:
    """VQA: one question per image."""
    rows = [prompts.vqa_prompt_ids(vocab, c, q) for c, q in zip(codes, questions)]
    return [_text_of(vocab, t) for t in generate_rows(params, config, vocab, rows, rng, gen).tokens]


def follow_instructions(params: Params, config: ModelConfig, vocab: Vocab,
                        instructions: Sequence[str], contexts: Sequence[str | None] | None,
                        rng: jax.Array, gen: GenerationConfig = REPORT_SAMPLING) -> list[str]:
    """Plain text instructions in dolly's format."""
    contexts = contexts or [None] * len(instructions)
    rows = [prompts.instruction_prompt_ids(vocab, i, c) for i, c in zip(instructions, contexts)]
    return [_text_of(vocab, t) for t in generate_rows(params, config, vocab, rows, rng, gen).tokens]
