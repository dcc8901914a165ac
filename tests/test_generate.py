"""Jitted KV-cache generation against full recomputation and against transformers' `generate`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.generation import logits_process as hf_lp  # noqa: E402

from llmcxr_jax.configs import ModelConfig  # noqa: E402
from llmcxr_jax.llm import hf_mapping  # noqa: E402
from llmcxr_jax.llm.constraints import (  # noqa: E402
    apply_mask, image_then_end_mask, valid_vocab_mask)
from llmcxr_jax.llm.generate import GenerationConfig, generate  # noqa: E402
from llmcxr_jax.llm.model import GPTNeoX, KVCache  # noqa: E402

VOCAB, N_VALID = 256, 250  # 6 padding rows past the real ids
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=128, rotary_pct=0.25, max_position_embeddings=128)
PROMPT_LENGTHS = (9, 5, 2)
N_NEW = 12


def _hf_model(config: ModelConfig, seed: int = 0) -> "transformers.GPTNeoXForCausalLM":
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                         "partial_rotary_factor": config.rotary_pct},
        use_parallel_residual=config.use_parallel_residual, tie_word_embeddings=False,
        max_position_embeddings=config.max_position_embeddings, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(hf_config).eval()
    with torch.no_grad():  # spread-out weights: greedy choices are far from ties
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("layernorm.weight") else 0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def reference():
    """(transformers model, our params) with the same random weights."""
    model = _hf_model(CONFIG)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, hf_mapping.params_from_state_dict(state, CONFIG, to_array=jnp.asarray)


def _init(config: ModelConfig, seed: int):
    """Random unboxed params of our own initialiser (jitted: op-by-op init is slow)."""
    init = jax.jit(lambda key: GPTNeoX(config).init(key, jnp.zeros((1, 4), jnp.int32)))
    return nn.unbox(init(jax.random.key(seed)))["params"]


def _prompts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of PROMPT_LENGTHS."""
    rng = np.random.default_rng(seed)
    length = max(PROMPT_LENGTHS)
    ids = np.zeros((len(PROMPT_LENGTHS), length), np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        ids[row, length - n:] = rng.integers(1, N_VALID, n)
        mask[row, length - n:] = 1
    return ids, mask


GREEDY = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, pad_id=VOCAB - 1)


def _uncached_greedy(params, config: ModelConfig, ids: np.ndarray, mask: np.ndarray,
                     n_new: int) -> np.ndarray:
    """Greedy decoding by re-running the full uncached model on prompt + generated each step.

    Each row sits left-aligned in a fixed buffer (causal attention: the slots after a row's
    last token do not change its logits), so one compiled forward serves every step.
    """
    forward = jax.jit(lambda p, x: GPTNeoX(config).apply({"params": p}, x))
    rows = ids.shape[0]
    lengths = mask.sum(1)
    buffer = np.zeros((rows, ids.shape[1] + n_new), np.int32)
    for row in range(rows):
        buffer[row, :lengths[row]] = ids[row][mask[row] == 1]
    for _ in range(n_new):
        logits = np.asarray(forward(params, jnp.asarray(buffer)))
        buffer[np.arange(rows), lengths] = logits[np.arange(rows), lengths - 1].argmax(-1)
        lengths = lengths + 1
    return np.stack([buffer[row, lengths[row] - n_new:lengths[row]] for row in range(rows)])


def test_cached_forward_matches_uncached():
    """Prefill of left-padded prompts, then one cached step: the logits of the same model run
    without a cache over the whole sequence.

    Sequential residual and full rotary here; the other tests use the Pythia form (parallel
    residual, rotary 0.25) against transformers and full recomputation.
    """
    config = dataclasses.replace(CONFIG, use_parallel_residual=False, rotary_pct=1.0,
                                 initializer_range=0.2)
    params = _init(config, 1)
    ids, mask = _prompts(1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    batch, length = ids.shape
    new = np.asarray([[3], [17], [101]], np.int32)
    model = GPTNeoX(config)

    @jax.jit
    def cached(params):
        first, cache = model.apply({"params": params}, ids, positions, mask,
                                   KVCache.init(config, batch, 32))
        second, cache = model.apply({"params": params}, new, positions[:, -1:] + 1,
                                    np.ones_like(new), cache, last_only=True)
        return first, second, cache

    first, second, cache = cached(params)
    full = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
        params, np.concatenate([ids, new], 1), np.concatenate([positions, positions[:, -1:] + 1], 1),
        np.concatenate([mask, np.ones_like(new)], 1))
    valid = mask == 1
    np.testing.assert_allclose(np.asarray(first)[valid], np.asarray(full[:, :-1])[valid],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(second[:, 0]), np.asarray(full[:, -1]),
                               rtol=1e-5, atol=1e-5)
    assert int(cache.index) == length + 1
    np.testing.assert_array_equal(np.asarray(cache.segment_ids[:, :length + 1]),
                                  np.concatenate([mask, np.ones_like(new)], 1))
    assert not np.asarray(cache.segment_ids[:, length + 1:]).any()


def test_cached_greedy_equals_uncached_recomputation(reference):
    _, params = reference
    ids, mask = _prompts(1)
    out = generate(params, CONFIG, ids, mask, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(np.asarray(out.tokens),
                                  _uncached_greedy(params, CONFIG, ids, mask, N_NEW))
    assert np.asarray(out.lengths).tolist() == [N_NEW] * 3
    assert not np.asarray(out.finished).any()


def test_greedy_matches_transformers_generate(reference):
    model, params = reference
    ids, mask = _prompts(2)
    out = generate(params, CONFIG, ids, mask, jax.random.key(0), GREEDY)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             do_sample=False, max_new_tokens=N_NEW, pad_token_id=0,
                             eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, ids.shape[1]:].numpy())


def test_stop_ids_per_sequence_and_global(reference):
    _, params = reference
    ids, mask = _prompts(2)
    free = np.asarray(generate(params, CONFIG, ids, mask, jax.random.key(0), GREEDY).tokens)
    # Row 0 stops at its 3rd token, row 1 at its 6th, row 2 never (its stop id never comes up).
    never = next(t for t in range(N_VALID) if t not in free[2])
    stops = [[free[0, 2]], [free[1, 5], never], [never]]
    out = generate(params, CONFIG, ids, mask, jax.random.key(0), GREEDY, stop_ids=stops)
    tokens = np.asarray(out.tokens)
    first_stop = [list(free[r]).index(stops[r][0]) + 1 if stops[r][0] in free[r] else N_NEW
                  for r in range(3)]
    for row, n in enumerate(first_stop):
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert (tokens[row, n:] == VOCAB - 1).all()
    assert np.asarray(out.lengths).tolist() == first_stop
    assert np.asarray(out.finished).tolist() == [True, True, False]
    # A global stop id (from the config) applies to every row.
    gen = dataclasses.replace(GREEDY, stop_ids=(int(free[2, 0]),))
    out = generate(params, CONFIG, ids, mask, jax.random.key(0), gen)
    assert np.asarray(out.lengths)[2] == 1 and bool(np.asarray(out.finished)[2])


SAMPLE = GenerationConfig(max_new_tokens=N_NEW, do_sample=True, top_p=0.5, top_k=0)


def test_sampled_tokens_stay_in_the_nucleus_of_the_full_model(reference):
    """Every sampled token lies in transformers' top-p nucleus of the uncached model's logits,
    padding rows are never sampled, and the tokens are reproducible from the key."""
    model, params = reference
    ids, mask = _prompts(3)
    valid = valid_vocab_mask(VOCAB, N_VALID)
    out = generate(params, CONFIG, ids, mask, jax.random.key(5), SAMPLE, valid_mask=valid)
    tokens = np.asarray(out.tokens)
    again = generate(params, CONFIG, ids, mask, jax.random.key(5), SAMPLE, valid_mask=valid)
    other = generate(params, CONFIG, ids, mask, jax.random.key(6), SAMPLE, valid_mask=valid)
    np.testing.assert_array_equal(tokens, np.asarray(again.tokens))
    assert (tokens != np.asarray(other.tokens)).any()
    assert (tokens < N_VALID).all()
    warper = hf_lp.TopPLogitsWarper(SAMPLE.top_p)
    for row in range(ids.shape[0]):
        seq = torch.tensor([list(ids[row][mask[row] == 1]) + list(tokens[row])])
        with torch.no_grad():
            logits = model(seq).logits[0, -N_NEW - 1:-1]
        logits[:, N_VALID:] = -float("inf")
        nucleus = torch.isfinite(warper(None, logits)).numpy()
        assert nucleus[np.arange(N_NEW), tokens[row]].all(), row


def test_padding_rows_are_never_sampled(reference):
    """Even when the model puts nearly all the mass on padding rows."""
    _, params = reference
    params = jax.tree_util.tree_map(lambda x: x, params)
    kernel = params["embed_out"]["kernel"]
    params["embed_out"]["kernel"] = kernel.at[:, N_VALID:].set(kernel[:, N_VALID:] * 0 + 10.0)
    ids, mask = _prompts(4)
    out = generate(params, CONFIG, ids, mask, jax.random.key(0), SAMPLE,
                   valid_mask=valid_vocab_mask(VOCAB, N_VALID))
    assert (np.asarray(out.tokens) < N_VALID).all()


def test_image_then_end_mask_forces_exact_count():
    """A random untrained model still emits exactly n image ids, then the end id, per row."""
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                         intermediate_size=64)  # our own initialiser: an "untrained" model
    params = _init(config, 2)
    offset, n_image, end_id, n = 200, 50, 7, 16
    hook = image_then_end_mask(image_offset=offset, n_image=n_image, end_id=end_id, n_tokens=n)
    gen = GenerationConfig(max_new_tokens=n + 4, do_sample=True, top_p=0.92, pad_id=0)
    ids, mask = _prompts(5)
    out = generate(params, config, ids, mask, jax.random.key(3), gen, stop_ids=[end_id],
                   logits_mask_fn=hook)
    tokens = np.asarray(out.tokens)
    assert ((tokens[:, :n] >= offset) & (tokens[:, :n] < offset + n_image)).all()
    assert (tokens[:, n] == end_id).all() and (tokens[:, n + 1:] == 0).all()
    assert np.asarray(out.lengths).tolist() == [n + 1] * 3
    assert np.asarray(out.finished).all()
    assert len(np.unique(tokens[:, :n])) > 5  # sampled, not a constant


def test_apply_mask_bool_and_bias():
    logits = jnp.arange(6.0)[None]
    np.testing.assert_array_equal(
        np.asarray(apply_mask(logits, jnp.asarray([[True, False] * 3]))),
        [[0.0, -np.inf, 2.0, -np.inf, 4.0, -np.inf]])
    np.testing.assert_array_equal(np.asarray(apply_mask(logits, jnp.full((1, 6), 0.5))),
                                  [[0.5, 1.5, 2.5, 3.5, 4.5, 5.5]])


def test_bad_inputs_raise(reference):
    _, params = reference
    ids, mask = _prompts(6)
    with pytest.raises(ValueError, match="left-padded"):
        generate(params, CONFIG, ids[:, ::-1], mask[:, ::-1], jax.random.key(0), GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, CONFIG, ids, mask * 0, jax.random.key(0), GREEDY)
    with pytest.raises(ValueError, match="stop_ids has 2 rows"):
        generate(params, CONFIG, ids, mask, jax.random.key(0), GREEDY, stop_ids=[[1], [2]])
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="end_id 210 is an image id"):
        image_then_end_mask(image_offset=200, n_image=50, end_id=210)
