"""Logits processors with transformers' semantics, and a fast exact sampler for the decode loop.

The processors (`apply_temperature`, `top_k_filter`, `top_p_filter`, `process_logits`) are direct
ports of transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper`
(min_tokens_to_keep=1, filter value -inf), applied in transformers' order: temperature, top-k,
top-p. `top_k=0` and `top_p=1.0` disable a filter.

`top_p_filter` needs a full sort of the vocabulary, which XLA on CPU does slowly (README,
Performance). `sample_tokens` therefore samples from exactly the same distribution without sorting:

1. draw a candidate from the (temperature, top-k) distribution by inverse-CDF sampling over
   blocks of the vocabulary (one uniform per row, one pass over the logits);
2. accept it if it lies in the top-p nucleus — a single masked sum gives the candidate's
   cumulative probability in transformers' ascending (value, index) order — else draw again.

Restricting a distribution to a set by rejection yields the renormalised distribution on that set,
which is what transformers samples from after `masked_fill(-inf)` + softmax. The nucleus holds at
least `top_p` of the mass, so a draw is accepted with probability >= top_p: on average at most
1 / top_p draws (about 1.1 at LLM-CXR's 0.92), each a couple of passes over the logits.
`top_p=0` keeps only the largest logit and needs no draw.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

_BLOCK = 128  # vocabulary block for two-level inverse-CDF sampling


def apply_temperature(logits: Array, temperature: float) -> Array:
    """transformers' TemperatureLogitsWarper: logits / temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Array, top_k: int) -> Array:
    """transformers' TopKLogitsWarper: -inf below the k-th largest logit (ties kept); 0 disables."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables), got {top_k}")
    if top_k == 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, top_p: float) -> Array:
    """transformers' TopPLogitsWarper (sort-based): keep the smallest top set with mass >= top_p.

    Sorts ascending, removes tokens whose cumulative probability is <= 1 - top_p, always keeps
    the last (largest) token. Ties are ordered by vocabulary index (a stable sort); torch.sort is
    not stable on CPU, so transformers itself breaks exact ties in no fixed order.
    """
    _check_top_p(top_p)
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def process_logits(logits: Array, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> Array:
    """Temperature, then top-k, then top-p, as transformers' sampling warpers ([batch, vocab])."""
    logits = apply_temperature(logits.astype(jnp.float32), temperature)
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def _check_top_p(top_p: float) -> None:
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")


def in_top_p_nucleus(logits: Array, candidates: Array, top_p: float) -> Array:
    """Whether each row's candidate token is kept by `top_p_filter` ([batch, vocab], [batch]).

    The candidate's cumulative probability in the ascending stable order is the mass of tokens
    with a smaller logit, plus tied tokens at or before its index: one pass, no sort.
    """
    _check_top_p(top_p)
    if top_p >= 1.0:
        return jnp.ones(candidates.shape, bool)
    vocab = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    cand_logit = jnp.take_along_axis(logits, candidates[:, None], axis=-1)
    index = jnp.arange(vocab)[None, :]
    before = (logits < cand_logit) | ((logits == cand_logit) & (index <= candidates[:, None]))
    cumulative = jnp.sum(jnp.where(before, probs, 0.0), axis=-1)
    # The last token of the stable ascending order (the largest logit, highest index among ties).
    last = _last_max(logits, jnp.max(logits, axis=-1, keepdims=True))
    return (cumulative > 1 - top_p) | (candidates == last)


def _blocks(weights: Array) -> tuple[Array, Array]:
    """Unnormalised weights [batch, vocab] -> zero-padded [batch, blocks, _BLOCK] and the
    cumulative block sums [batch, blocks]."""
    batch, vocab = weights.shape
    n_blocks = -(-vocab // _BLOCK)
    blocks = jnp.pad(weights, ((0, 0), (0, n_blocks * _BLOCK - vocab)))
    blocks = blocks.reshape(batch, n_blocks, _BLOCK)
    return blocks, _cumsum(jnp.sum(blocks, axis=-1))


def _inverse_cdf_draw(uniform: Array, blocks: Array, block_cumsum: Array) -> Array:
    """One draw per row from unnormalised weights in `_blocks` form, given uniforms [batch].

    Finds the block, then the token, whose cumulative weight first exceeds uniform * total:
    one pass over the block sums and one over a single block. int32 [batch].
    """
    n_blocks = blocks.shape[1]
    target = uniform * block_cumsum[:, -1]
    block = jnp.minimum(jnp.sum(block_cumsum <= target[:, None], axis=-1), n_blocks - 1)
    before = jnp.where(block > 0, jnp.take_along_axis(
        block_cumsum, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    local = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    local_cumsum = before[:, None] + _cumsum(local)
    offset = jnp.minimum(jnp.sum(local_cumsum <= target[:, None], axis=-1), _BLOCK - 1)
    return (block * _BLOCK + offset).astype(jnp.int32)


def _cumsum(x: Array) -> Array:
    """Cumulative sum over the last axis of a short array as a triangular matmul (fast on CPU)."""
    n = x.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.matmul(x, upper, precision=jax.lax.Precision.HIGHEST)


def _weight_at(blocks: Array, tokens: Array) -> Array:
    flat = blocks.reshape(blocks.shape[0], -1)
    return jnp.take_along_axis(flat, tokens[:, None], axis=-1)[:, 0]


def fold_in(rng: Array, data: Any) -> Array:
    """`jax.random.fold_in` for one key or a [batch] array of per-row keys."""
    if rng.ndim == 0:
        return jax.random.fold_in(rng, data)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, data)


def _uniforms(rng: Array, batch: int) -> Array:
    """[batch] uniforms: from one key, or one draw from each row's own key."""
    if rng.ndim == 0:
        return jax.random.uniform(rng, (batch,), jnp.float32)
    if rng.shape != (batch,):
        raise ValueError(f"{rng.shape[0]} per-row keys for {batch} rows")
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(rng)


def sample_tokens(rng: Array, logits: Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """One token per row from softmax(process_logits(logits, ...)), without a vocabulary sort.
    `rng` is one key, or a [batch] array of keys (row i then draws only from key i).

    logits [batch, vocab] (disallowed tokens already -inf) -> int32 [batch]. Exact in
    distribution up to float rounding; see the module docstring. A row without any finite logit
    (everything masked, or NaN) returns token 0 rather than looping.
    """
    _check_top_p(top_p)
    logits = top_k_filter(apply_temperature(logits.astype(jnp.float32), temperature), top_k)
    batch, vocab = logits.shape
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if top_p == 0.0:  # the nucleus is the last token of the stable ascending order
        return jnp.where(jnp.isfinite(row_max[:, 0]), _last_max(logits, row_max), 0)
    weights = jnp.exp(logits - row_max)
    blocks, block_cumsum = _blocks(weights)
    degenerate = ~jnp.isfinite(row_max[:, 0]) | ~(block_cumsum[:, -1] > 0)

    def cond(state):
        return ~jnp.all(state[1])

    def body(state):
        tokens, accepted, draws = state
        uniform = _uniforms(fold_in(rng, draws), batch)
        candidates = _inverse_cdf_draw(uniform, blocks, block_cumsum)
        in_nucleus = in_top_p_nucleus(logits, jnp.minimum(candidates, vocab - 1), top_p)
        take = ~accepted & (_weight_at(blocks, candidates) > 0) & in_nucleus
        return jnp.where(take, candidates, tokens), accepted | take, draws + 1

    init = (jnp.zeros((batch,), jnp.int32), degenerate, jnp.int32(0))
    return jax.lax.while_loop(cond, body, init)[0]


def _last_max(logits: Array, row_max: Array) -> Array:
    """Per row, the highest index holding the row's maximum (int32 [batch])."""
    index = jnp.arange(logits.shape[-1])
    return jnp.max(jnp.where(logits == row_max, index, -1), axis=-1).astype(jnp.int32)


def greedy_tokens(logits: Array) -> Array:
    """argmax per row (first index on ties, as torch.argmax) -> int32 [batch]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
