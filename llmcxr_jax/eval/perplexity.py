"""Perplexity of a GPT-NeoX model on held-out instruction examples, response tokens only.

An example is a token id array with a per-token loss mask (`text.prompts.Example`: mask 1 on the
response tokens through `### End`). Token t is scored by the logits at position t - 1, with the
mask's weight at t, so the prompt conditions but is never scored. Examples are sorted by length,
padded (segment id 0) to a bucket length (a multiple of `bucket`) and run in fixed-size batches,
so only a few shapes are compiled; padding rows and positions carry zero weight.

    perplexity = exp(sum of response-token NLL / number of response tokens)

pooled over all examples (the token-level perplexity). The mean of per-example perplexities is
reported too, since both appear in the literature.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.train.loss import token_nll_and_correct


def _as_pair(example: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss_mask) from an Example-like object or an (ids, mask) pair."""
    if hasattr(example, "ids") and hasattr(example, "loss_mask"):
        ids, mask = example.ids, example.loss_mask
    else:
        ids, mask = example
    ids, mask = np.asarray(ids), np.asarray(mask, np.float32)
    if ids.ndim != 1 or ids.shape != mask.shape:
        raise ValueError(f"example {index}: ids {ids.shape} and loss mask {mask.shape} must be "
                         f"1-D of equal length")
    return ids.astype(np.int32), mask


@functools.partial(jax.jit, static_argnums=0)
def _nll_sums(config: ModelConfig, params: Any, inputs: jax.Array, targets: jax.Array,
              segment_ids: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row (NLL sum, weight sum, correct-argmax sum) over weighted targets."""
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits = GPTNeoX(config).apply({"params": params}, inputs, positions, segment_ids)
    nll, correct = token_nll_and_correct(logits, targets)
    return (jnp.sum(nll * weights, axis=1), jnp.sum(weights, axis=1),
            jnp.sum(correct * weights, axis=1))


def _batches(pairs: list[tuple[np.ndarray, np.ndarray]], batch_size: int, bucket: int
             ) -> Iterable[tuple[np.ndarray, ...]]:
    """(example indices, inputs, targets, segment ids, weights) batches, length-sorted."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        longest = max(len(pairs[i][0]) - 1 for i in idx)
        length = max(bucket, -(-longest // bucket) * bucket)
        inputs = np.zeros((batch_size, length), np.int32)
        targets = np.zeros((batch_size, length), np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        weights = np.zeros((batch_size, length), np.float32)
        for row, i in enumerate(idx):
            ids, mask = pairs[i]
            n = len(ids) - 1
            inputs[row, :n], targets[row, :n] = ids[:-1], ids[1:]
            segments[row, :n] = 1
            weights[row, :n] = mask[1:]
        yield np.asarray(idx), inputs, targets, segments, weights


def perplexity(config: ModelConfig, params: Any, examples: Sequence[Any], batch_size: int = 8,
               bucket: int = 64, max_len: int | None = None, progress: bool = False
               ) -> dict[str, Any]:
    """Response-token perplexity of `examples` (Examples or (ids, loss_mask) pairs).

    Examples without a scored token, or longer than `max_len` (default
    `config.max_position_embeddings`), are skipped and counted. Returns perplexity, nll_per_token,
    token_accuracy (argmax), tokens, examples, mean_example_perplexity, skipped and per_example_nll
    (mean NLL per example in input order, NaN for skipped ones).
    """
    if batch_size < 1 or bucket < 1:
        raise ValueError(f"batch_size ({batch_size}) and bucket ({bucket}) must be >= 1")
    max_len = max_len or config.max_position_embeddings
    params = nn.meta.unbox(params)
    pairs, keep = [], []
    skipped = {"no_scored_tokens": 0, "too_long": 0}
    for i, ex in enumerate(examples):
        ids, mask = _as_pair(ex, i)
        if len(ids) > max_len:
            skipped["too_long"] += 1
        elif len(ids) < 2 or mask[1:].sum() == 0:
            skipped["no_scored_tokens"] += 1
        else:
            if ids.min() < 0 or ids.max() >= config.vocab_size:
                raise ValueError(f"example {i}: token ids outside [0, {config.vocab_size})")
            pairs.append((ids, mask))
            keep.append(i)
    if not pairs:
        raise ValueError(f"no example has a scored response token (skipped: {skipped})")
    nll_sum = np.zeros(len(pairs))
    count = np.zeros(len(pairs))
    correct = np.zeros(len(pairs))
    batches = list(_batches(pairs, batch_size, bucket))
    for idx, inputs, targets, segments, weights in tqdm(batches, desc="perplexity",
                                                        disable=not progress):
        s, w, c = _nll_sums(config, params, inputs, targets, segments, weights)
        n = len(idx)
        nll_sum[idx], count[idx], correct[idx] = (np.asarray(s)[:n], np.asarray(w)[:n],
                                                  np.asarray(c)[:n])
    total_nll, total = float(nll_sum.sum()), float(count.sum())
    per_example = np.full(len(examples), math.nan)
    per_example[keep] = nll_sum / count
    return {"perplexity": math.exp(total_nll / total), "nll_per_token": total_nll / total,
            "token_accuracy": float(correct.sum()) / total, "tokens": int(total),
            "examples": len(pairs),
            "mean_example_perplexity": float(np.mean(np.exp(nll_sum / count))),
            "skipped": skipped, "per_example_nll": per_example.tolist()}
