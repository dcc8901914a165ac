"""Logits warpers against transformers' own warpers, and the sort-free sampler's distribution."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.generation import logits_process as hf_lp  # noqa: E402

from llmcxr_jax.llm import sampling  # noqa: E402

VOCAB = 300  # not a multiple of the sampler's 128-wide blocks: the padding path is exercised


def _random_logits(seed: int, rows: int = 4, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, VOCAB)) * scale).astype(np.float32)


def _hf(warper, logits: np.ndarray) -> np.ndarray:
    return warper(None, torch.tensor(logits)).numpy()


def _numpy_top_p_keep(logits: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper rule in NumPy with a stable ascending sort (ties by index)."""
    keep = np.zeros(logits.shape, bool)
    for row, values in enumerate(logits.astype(np.float64)):
        order = np.argsort(values, kind="stable")
        probs = np.exp(values[order] - values.max())
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative <= 1 - top_p
        remove[-1] = False
        keep[row, order] = ~remove
    return keep


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_temperature_matches_transformers(temperature):
    logits = _random_logits(0)
    ours = np.asarray(sampling.apply_temperature(jnp.asarray(logits), temperature))
    ref = _hf(hf_lp.TemperatureLogitsWarper(temperature), logits)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(top_k):
    logits = _random_logits(1)
    logits[0, :20] = logits[0].max()  # ties at the k-th value are kept by both
    ours = np.asarray(sampling.top_k_filter(jnp.asarray(logits), top_k))
    ref = _hf(hf_lp.TopKLogitsWarper(top_k), logits)
    np.testing.assert_array_equal(ours, ref)
    assert sampling.top_k_filter(jnp.asarray(logits), 0) is not None  # 0 disables
    np.testing.assert_array_equal(np.asarray(sampling.top_k_filter(jnp.asarray(logits), 0)),
                                  logits)


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.92, 0.999])
def test_top_p_matches_transformers(top_p):
    logits = _random_logits(2, rows=6)
    logits[5] = np.float32(0.01) * np.arange(VOCAB)  # a nearly flat row: a large nucleus
    ours = np.asarray(sampling.top_p_filter(jnp.asarray(logits), top_p))
    ref = _hf(hf_lp.TopPLogitsWarper(top_p), logits)
    np.testing.assert_array_equal(ours, ref)
    assert (np.isfinite(ours).sum(-1) >= 1).all()


def test_top_p_ties_follow_stable_ascending_order():
    logits = np.zeros((2, VOCAB), np.float32)  # all tied: the highest indices are the top
    logits[1, ::3] = 1.0
    for top_p in (0.101, 0.5012, 0.9013):  # boundaries away from exact k/300 float ties
        keep = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits), top_p)))
        np.testing.assert_array_equal(keep, _numpy_top_p_keep(logits, top_p))


def test_process_logits_matches_transformers_chain():
    logits = _random_logits(3)
    chain = hf_lp.LogitsProcessorList([hf_lp.TemperatureLogitsWarper(0.8),
                                       hf_lp.TopKLogitsWarper(40), hf_lp.TopPLogitsWarper(0.9)])
    ours = np.asarray(sampling.process_logits(jnp.asarray(logits), 0.8, 40, 0.9))
    ref = chain(None, torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_nucleus_membership_equals_sort_based_filter(top_p):
    logits = _random_logits(4)
    logits[2, 100:200] = logits[2, 150]  # a block of ties
    x = jnp.asarray(logits)
    member = jax.vmap(lambda c: sampling.in_top_p_nucleus(
        x, jnp.full((x.shape[0],), c, jnp.int32), top_p), out_axes=1)(jnp.arange(VOCAB))
    np.testing.assert_array_equal(np.asarray(member),
                                  np.isfinite(np.asarray(sampling.top_p_filter(x, top_p))))


@functools.lru_cache(maxsize=None)
def _sampler(temperature: float, top_k: int, top_p: float):
    return jax.jit(lambda key, logits: sampling.sample_tokens(key, logits, temperature, top_k,
                                                              top_p))


def _draw(key, logits: np.ndarray, n: int, temperature: float = 1.0, top_k: int = 0,
          top_p: float = 1.0) -> np.ndarray:
    """n independent draws per row -> [n, rows]: the rows are tiled n times (one call)."""
    rows = logits.shape[0]
    tiled = jnp.asarray(np.tile(logits, (n, 1)))
    return np.asarray(_sampler(temperature, top_k, top_p)(key, tiled)).reshape(n, rows)


def _frequencies(draws: np.ndarray) -> np.ndarray:
    """[n_draws, rows] -> empirical distribution [rows, VOCAB]."""
    return np.stack([np.bincount(draws[:, r], minlength=VOCAB) for r in range(draws.shape[1])]
                    ) / draws.shape[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.92), (0.7, 20, 0.8),
                                                     (1.0, 0, 1.0)])
def test_sampler_stays_in_nucleus_and_matches_its_distribution(temperature, top_k, top_p):
    logits = _random_logits(5)
    logits[3, 250:] = -np.inf  # masked tokens (padding rows) are never drawn
    draws = _draw(jax.random.key(0), logits, 4000, temperature, top_k, top_p)
    chain = [hf_lp.TemperatureLogitsWarper(temperature)]
    if top_k:
        chain.append(hf_lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(hf_lp.TopPLogitsWarper(top_p))
    processed = hf_lp.LogitsProcessorList(chain)(None, torch.tensor(logits))
    target = torch.softmax(processed, dim=-1).numpy()
    allowed = target > 0
    rows = np.arange(logits.shape[0])
    assert allowed[rows[None, :], draws].all(), "a token outside the nucleus was sampled"
    total_variation = 0.5 * np.abs(_frequencies(draws) - target).sum(-1)
    assert (total_variation < 0.08).all(), total_variation


def test_sampler_small_and_zero_top_p():
    """A tiny top_p on a flat distribution rejects most draws (many rounds); top_p=0 keeps only
    the last largest logit; a row with nothing allowed returns 0 instead of looping."""
    logits = np.tile(np.float32(0.001) * np.arange(VOCAB), (2, 1))
    draws = _draw(jax.random.key(1), logits, 200, top_p=0.01)
    keep = _numpy_top_p_keep(logits, 0.01)
    assert (keep.sum(-1) <= 5).all()  # ~1/300 each: a few of the largest make up >= 1 %
    for row in range(2):
        assert set(draws[:, row].tolist()) == set(np.flatnonzero(keep[row]).tolist())
    tied = np.zeros((3, VOCAB), np.float32)
    tied[0, [5, 9]] = 1.0
    tied[2] = -np.inf
    zero = np.asarray(sampling.sample_tokens(jax.random.key(0), jnp.asarray(tied), top_p=0.0))
    assert zero.tolist() == [9, VOCAB - 1, 0]
    # (torch.sort is not stable, so transformers breaks such ties arbitrarily; we follow the
    # stable order, as the NumPy reference does.)
    assert np.flatnonzero(_numpy_top_p_keep(tied[:1], 0.0)[0]).tolist() == [9]
    nothing = _draw(jax.random.key(0), tied[2:], 1, top_p=0.01)
    assert nothing.tolist() == [[0]]


def test_sampler_reproducible_from_key():
    logits = _random_logits(6)
    a, b = (_draw(jax.random.key(3), logits, 4000, top_p=0.92) for _ in range(2))
    c = _draw(jax.random.key(4), logits, 4000, top_p=0.92)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_greedy_is_first_argmax():
    logits = _random_logits(7)
    logits[1, 10] = logits[1, 20] = logits[1].max() + 1
    np.testing.assert_array_equal(np.asarray(sampling.greedy_tokens(jnp.asarray(logits))),
                                  torch.tensor(logits).argmax(-1).numpy())


def test_bad_arguments_raise():
    x = jnp.zeros((1, VOCAB))
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_filter(x, 1.5)
    with pytest.raises(ValueError, match="top_k"):
        sampling.top_k_filter(x, -1)
    with pytest.raises(ValueError, match="temperature"):
        sampling.apply_temperature(x, 0.0)
