"""Batched autoregressive generation with a KV cache, entirely inside `jax.jit`.

One call of the model (`GPTNeoX` with a `KVCache`, the forward pass training runs) prefills the
left-padded prompts, then a `lax.while_loop` decodes one token per iteration with the cache in
the loop carry (updated in place) until every sequence has emitted a stop token or
`max_new_tokens` are done. Nothing returns to the host per token.

Sampling follows transformers' `generate`: greedy (`do_sample=False`) takes the argmax; sampling
applies temperature, top-k, top-p (`sampling.py`) and draws from the softmax. A finished sequence
emits `pad_id`. Padding rows of the vocabulary (`valid_mask`) and an optional per-step logits-mask
hook (`constraints.py`) are applied before the sampling warpers, like transformers' logits
processors.

Classifier-free guidance (`guidance` S != 1): each prompt's unconditional twin (the same prompt
with `prompts.NULL_REPORT` as its input) is decoded in the same loop, the batch doubled to
[prompts; twins]. Every step mixes each pair's logits as `uncond + S * (cond - uncond)`, applies
the valid mask, the hook and the sampler once per pair, and appends the chosen token to both
rows. S = 1 takes the plain path: the twins are ignored and nothing of guidance is compiled.

Shapes are bucketed to limit recompiles: prompts are left-padded to a multiple of
`length_multiple` and the cache holds `round_up(prompt + max_new_tokens, length_multiple)` slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax.configs import ModelConfig, round_up
from llmcxr_jax.llm.constraints import DecodeState, LogitsMaskFn, apply_mask
from llmcxr_jax.llm.model import GPTNeoX, KVCache, Params, with_split_layers
from llmcxr_jax.llm.sampling import fold_in, greedy_tokens, sample_tokens

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (static: a change recompiles). The original LLM-CXR samples with
    top_p=0.92, top_k=0, temperature=1 and stops at `### End`."""

    max_new_tokens: int = 128
    do_sample: bool = True  # False: greedy
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    stop_ids: tuple[int, ...] = ()  # global stop ids; `generate(stop_ids=...)` sets them per row
    pad_id: int = 0  # emitted after a sequence has stopped
    length_multiple: int = 64  # prompt and cache lengths are rounded up to this

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {self.length_multiple}")


@flax.struct.dataclass
class GenerationOutput:
    tokens: Array  # [batch, max_new_tokens] int32, pad_id after a stop token
    lengths: Array  # [batch] int32: generated tokens, the stop token included
    finished: Array  # [batch] bool: stopped by a stop token (else ran out of max_new_tokens)


def generate(params: Params, config: ModelConfig, prompt_ids: Any, prompt_mask: Any, rng: Array,
             gen: GenerationConfig, *, stop_ids: Any = None, valid_mask: Any = None,
             logits_mask_fn: LogitsMaskFn | None = None, guidance: float = 1.0,
             uncond_ids: Any = None, uncond_mask: Any = None) -> GenerationOutput:
    """Generate up to `gen.max_new_tokens` tokens after each left-padded prompt.

    Args:
      params: GPT-NeoX params (`GPTNeoX(config)`).
      prompt_ids, prompt_mask: [batch, length]; prompts are left-padded (mask 0 on the left), and
        every row needs at least one real token.
      rng: a PRNG key, or a [batch] array of keys, one per row: row i then samples only from
        its own key, so its tokens do not depend on the other rows (up to the float rounding of
        a different batch or padding). The same key(s) give the same tokens.
      stop_ids: per-row stop ids, [batch, n] (-1 = unused) or [n] for all rows; default
        `gen.stop_ids`.
      valid_mask: [vocab] bool, False for ids never to be sampled (padding rows of the embedding,
        e.g. `Vocab.valid_token_mask()` or `constraints.valid_vocab_mask`); default all rows.
      logits_mask_fn: an optional per-step hook (see `constraints.py`).
      guidance: the classifier-free guidance scale S (module docstring); 1 = plain decoding.
      uncond_ids, uncond_mask: with S != 1, each prompt's unconditional twin, [batch, length']
        left-padded (any length').
    """
    prompt_ids, mask = _checked_prompts(prompt_ids, prompt_mask, "prompt")
    batch = prompt_ids.shape[0]
    scale = None
    if not np.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    if guidance != 1.0:
        if uncond_ids is None or uncond_mask is None:
            raise ValueError(f"guidance {guidance} needs uncond_ids and uncond_mask (the prompts' "
                             "unconditional twins)")
        twin_ids, twin_mask = _checked_prompts(uncond_ids, uncond_mask, "uncond")
        if twin_ids.shape[0] != batch:
            raise ValueError(f"{twin_ids.shape[0]} unconditional twins for {batch} prompts")
        width = max(prompt_ids.shape[1], twin_ids.shape[1])

        def left_pad(x: np.ndarray, value: Any) -> np.ndarray:
            return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)

        prompt_ids = np.concatenate([left_pad(prompt_ids, gen.pad_id),
                                     left_pad(twin_ids, gen.pad_id)])  # rows [prompts; twins]
        mask = np.concatenate([left_pad(mask, False), left_pad(twin_mask, False)])
        scale = jnp.float32(guidance)
    length = prompt_ids.shape[1]
    padded = round_up(length, gen.length_multiple)
    ids = np.pad(prompt_ids, ((0, 0), (padded - length, 0)),
                 constant_values=gen.pad_id)
    mask = np.pad(mask.astype(np.int32), ((0, 0), (padded - length, 0)))
    stops = _stop_array(gen.stop_ids if stop_ids is None else stop_ids, batch)
    if valid_mask is None:
        valid_mask = np.ones((config.vocab_size,), bool)
    valid_mask = np.asarray(valid_mask, bool)
    if valid_mask.shape != (config.vocab_size,):
        raise ValueError(f"valid_mask has shape {valid_mask.shape}, expected ({config.vocab_size},)")
    max_len = round_up(padded + gen.max_new_tokens, gen.length_multiple)
    # Stop ids travel as an array: configs differing only in them share one compiled loop; so
    # does the guidance scale (None, the plain path, compiles a loop without guidance).
    return _generate(params, jnp.asarray(ids), jnp.asarray(mask), rng, jnp.asarray(stops),
                     jnp.asarray(valid_mask), scale, config=config,
                     gen=dataclasses.replace(gen, stop_ids=()), max_len=max_len,
                     logits_mask_fn=logits_mask_fn)


def _checked_prompts(ids: Any, mask: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [batch, length] prompts as (int32 ids, bool mask), or a ValueError."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"{name}_ids {ids.shape} and {name}_mask {mask.shape} must be the same "
                         "[batch, length] shape")
    mask = mask.astype(bool)
    if not mask.any(axis=1).all():
        raise ValueError(f"every prompt needs at least one token (a row of {name}_mask is all 0)")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(f"prompts must be left-padded: {name}_mask has a 0 after a 1")
    return ids.astype(np.int32), mask


def _stop_array(stop_ids: Any, batch: int) -> np.ndarray:
    """[batch, n] int32 stop ids, -1 padded (n >= 1): from one list for all rows or one per row."""
    if isinstance(stop_ids, (list, tuple)) and any(
            isinstance(s, (list, tuple, np.ndarray)) for s in stop_ids):
        rows = [np.asarray(s, np.int64).reshape(-1) for s in stop_ids]
    else:
        arr = np.asarray(stop_ids, np.int64)
        if arr.ndim > 2:
            raise ValueError(f"stop_ids must be [n] or [batch, n], got shape {arr.shape}")
        rows = list(arr) if arr.ndim == 2 else [arr.reshape(-1)] * batch
    if len(rows) != batch:
        raise ValueError(f"stop_ids has {len(rows)} rows for a batch of {batch}")
    # Width rounded up to a multiple of 4 so a few more stop ids do not recompile the loop.
    stops = np.full((batch, round_up(max([1] + [len(r) for r in rows]), 4)), -1, np.int32)
    for i, row in enumerate(rows):
        stops[i, :len(row)] = row
    return stops


@functools.partial(jax.jit, static_argnames=("config", "gen", "max_len", "logits_mask_fn"))
def _generate(params: Params, prompt_ids: Array, prompt_mask: Array, rng: Array, stops: Array,
              valid_mask: Array, guidance: Array | None, *, config: ModelConfig,
              gen: GenerationConfig, max_len: int,
              logits_mask_fn: LogitsMaskFn | None) -> GenerationOutput:
    """The decode loop. With a `guidance` scale the rows are [prompts; twins] and everything
    per sequence (keys, stops, tokens, hook state) has one row per pair."""
    rows = prompt_ids.shape[0]
    batch = rows if guidance is None else rows // 2
    n_new = gen.max_new_tokens
    model = GPTNeoX(config)
    params = with_split_layers(params, config.num_layers)  # once, not in every loop step

    def forward(ids: Array, positions: Array, segment_ids: Array,
                cache: KVCache) -> tuple[Array, KVCache]:
        """`GPTNeoX` over new tokens written at `cache.index`: the last one's logits."""
        logits, cache = model.apply({"params": params}, ids, positions, segment_ids, cache,
                                    last_only=True)
        return logits[:, -1], cache

    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = forward(prompt_ids, positions, prompt_mask,
                            KVCache.init(config, rows, max_len))

    def pair_logits(logits: Array) -> Array:
        """[rows, vocab] -> [batch, vocab] fp32: guided `uncond + S * (cond - uncond)`."""
        logits = logits.astype(jnp.float32)
        if guidance is None:
            return logits
        cond, uncond = logits[:batch], logits[batch:]
        return uncond + guidance * (cond - uncond)

    def to_rows(token: Array) -> Array:
        """A token per sequence -> the next input of every row (both rows of a pair)."""
        return token if guidance is None else jnp.concatenate([token, token])

    def choose(step: Array, logits: Array, tokens: Array, lengths: Array,
               finished: Array) -> tuple[Array, Array, Array, Array]:
        """Pick token `step` for every sequence and update the per-sequence bookkeeping."""
        logits = jnp.where(valid_mask, pair_logits(logits), -jnp.inf)
        if logits_mask_fn is not None:
            state = DecodeState(step=step, tokens=tokens, lengths=lengths, finished=finished,
                                vocab_size=config.vocab_size)
            logits = apply_mask(logits, logits_mask_fn(state))
        if gen.do_sample:
            token = sample_tokens(fold_in(rng, step), logits, gen.temperature,
                                  gen.top_k, gen.top_p)
        else:
            token = greedy_tokens(logits)
        token = jnp.where(finished, gen.pad_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | jnp.any(token[:, None] == stops, axis=1)
        return token, tokens, lengths, finished

    tokens = jnp.full((batch, n_new), gen.pad_id, jnp.int32)
    lengths = jnp.zeros((batch,), jnp.int32)
    finished = jnp.zeros((batch,), bool)
    token, tokens, lengths, finished = choose(jnp.int32(0), logits, tokens, lengths, finished)

    def cond(carry):
        step, finished = carry[0], carry[-1]
        return (step < n_new) & ~jnp.all(finished)

    def body(carry):
        step, cache, position, token, tokens, lengths, finished = carry
        logits, cache = forward(to_rows(token)[:, None], position[:, None],
                                jnp.ones((rows, 1), jnp.int32), cache)
        token, tokens, lengths, finished = choose(step, logits, tokens, lengths, finished)
        return step + 1, cache, position + 1, token, tokens, lengths, finished

    carry = (jnp.int32(1), cache, positions[:, -1] + 1, token, tokens, lengths, finished)
    carry = jax.lax.while_loop(cond, body, carry)
    tokens, lengths, finished = carry[-3:]
    return GenerationOutput(tokens=tokens, lengths=lengths, finished=finished)
