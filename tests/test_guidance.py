"""Classifier-free guidance in the jitted decode loop, against hand-mixed full-model logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm import generate as generate_lib
from llmcxr_jax.llm.constraints import image_then_end_mask, valid_vocab_mask
from llmcxr_jax.llm.generate import GenerationConfig, generate
from llmcxr_jax.llm.inference import left_pad
from llmcxr_jax.llm.model import GPTNeoX

VOCAB, N_VALID = 256, 250
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=128, rotary_pct=0.25, max_position_embeddings=128,
                     initializer_range=0.2)  # spread-out weights: greedy far from ties
PAD = VOCAB - 1
N_NEW = 6


@pytest.fixture(scope="module")
def params():
    init = jax.jit(lambda key: GPTNeoX(CONFIG).init(key, jnp.zeros((1, 4), jnp.int32)))
    return nn.unbox(init(jax.random.key(0)))["params"]


def _rows(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, N_VALID, n).tolist() for n in lengths]


# Conditional prompts and their twins; one twin longer than its prompt, one shorter.
COND = _rows((9, 4), 1)
UNCOND = _rows((3, 7), 2)


def _hand_mixed_greedy(params, scale: float, n_new: int) -> np.ndarray:
    """Greedy tokens from full uncached forwards of each conditional and unconditional sequence
    (prompt + the tokens chosen so far), mixed by hand in numpy."""
    forward = jax.jit(lambda p, x: GPTNeoX(CONFIG).apply({"params": p}, x))
    seqs = [list(r) for r in COND + UNCOND]
    batch = len(COND)
    buffer = np.zeros((len(seqs), max(map(len, seqs)) + n_new), np.int32)
    chosen = np.zeros((batch, n_new), np.int32)
    valid = valid_vocab_mask(VOCAB, N_VALID)
    for step in range(n_new):
        for i, s in enumerate(seqs):  # left-aligned: the slots after a sequence do not matter
            buffer[i, :len(s)] = s
        logits = np.asarray(forward(params, jnp.asarray(buffer)), np.float64)
        last = logits[np.arange(len(seqs)), [len(s) - 1 for s in seqs]]
        mixed = last[batch:] + scale * (last[:batch] - last[batch:])
        chosen[:, step] = np.where(valid, mixed, -np.inf).argmax(-1)
        for i in range(len(seqs)):
            seqs[i].append(int(chosen[i % batch, step]))
    return chosen


def _generate(params, gen, rng, scale, **kw):
    ids, mask = left_pad(COND, PAD)
    uids, umask = left_pad(UNCOND, PAD)
    return generate(params, CONFIG, ids, mask, rng, gen,
                    valid_mask=valid_vocab_mask(VOCAB, N_VALID), guidance=scale, uncond_ids=uids,
                    uncond_mask=umask, **kw)


def test_guided_greedy_equals_argmax_of_hand_mixed_logits(params):
    gen = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, pad_id=PAD)
    plain = _hand_mixed_greedy(params, 1.0, N_NEW)
    for scale in (3.0, 0.0):  # S = 0: the unconditional twins' own greedy continuation
        guided = np.asarray(_generate(params, gen, jax.random.key(0), scale).tokens)
        np.testing.assert_array_equal(guided, _hand_mixed_greedy(params, scale, N_NEW))
        assert (guided != plain).any()  # the mixing changed something


def test_sampled_guidance_keeps_the_image_constraint_and_s1_is_the_plain_path(params):
    """Under the report -> image hook: S = 1 gives the plain loop's tokens for the same keys and
    compiles nothing; S = 2 and S = 5 share one guided loop, and each draws exactly n image ids
    then the end id."""
    offset, n_image, end_id, n = 200, 50, 7, 12
    hook = image_then_end_mask(image_offset=offset, n_image=n_image, end_id=end_id, n_tokens=n)
    gen = GenerationConfig(max_new_tokens=n + 3, do_sample=True, top_p=0.92, pad_id=0)
    keys = jax.vmap(jax.random.key)(jnp.arange(len(COND)))
    kw = dict(stop_ids=[end_id], logits_mask_fn=hook)
    ids, mask = left_pad(COND, PAD)
    plain = generate(params, CONFIG, ids, mask, keys, gen,
                     valid_mask=valid_vocab_mask(VOCAB, N_VALID), **kw)
    compiled = generate_lib._generate._cache_size()
    one = _generate(params, gen, keys, 1.0, **kw)  # twins given, but S = 1: not decoded
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(plain.tokens))
    assert generate_lib._generate._cache_size() == compiled  # nothing new compiled
    two = _generate(params, gen, keys, 2.0, **kw)
    assert generate_lib._generate._cache_size() == compiled + 1  # the guided loop
    five = _generate(params, gen, keys, 5.0, **kw)
    assert generate_lib._generate._cache_size() == compiled + 1  # the scale is an argument
    assert (np.asarray(two.tokens) != np.asarray(five.tokens)).any()
    for out in (two, five):
        tokens = np.asarray(out.tokens)
        assert ((tokens[:, :n] >= offset) & (tokens[:, :n] < offset + n_image)).all()
        assert (tokens[:, n] == end_id).all() and (tokens[:, n + 1:] == 0).all()
        assert np.asarray(out.lengths).tolist() == [n + 1] * len(COND)
        assert np.asarray(out.finished).all()


def test_guidance_input_errors(params):
    gen = GenerationConfig(max_new_tokens=2, do_sample=False, pad_id=PAD)
    ids, mask = left_pad(COND, PAD)
    with pytest.raises(ValueError, match="needs uncond_ids"):
        generate(params, CONFIG, ids, mask, jax.random.key(0), gen, guidance=2.0)
    uids, umask = left_pad(UNCOND[:1], PAD)
    with pytest.raises(ValueError, match="1 unconditional twins for 2 prompts"):
        generate(params, CONFIG, ids, mask, jax.random.key(0), gen, guidance=2.0,
                 uncond_ids=uids, uncond_mask=umask)
    with pytest.raises(ValueError, match="finite"):
        generate(params, CONFIG, ids, mask, jax.random.key(0), gen, guidance=float("nan"))
    uids, umask = left_pad(UNCOND, PAD)
    with pytest.raises(ValueError, match="uncond_mask has a 0 after a 1"):
        generate(params, CONFIG, ids, mask, jax.random.key(0), gen, guidance=2.0,
                 uncond_ids=uids, uncond_mask=umask[:, ::-1])
