"""Response-only perplexity vs a direct per-example computation from the model's logits."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from llmcxr_jax import configs
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.eval.perplexity import perplexity

CFG = configs.model_preset("tiny", num_layers=1, max_position_embeddings=64)


def _params(seed: int = 0):
    """Random params drawn on the host (N(0, 0.02) weights, unit LayerNorm scales)."""
    shapes = jax.eval_shape(lambda: GPTNeoX(CFG).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) * 0.2).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, nn.meta.unbox(shapes))["params"]


def _examples():
    rng = np.random.default_rng(1)
    out = []
    for length, start in ((11, 5), (11, 3), (19, 9)):
        ids = rng.integers(0, 3000, length).astype(np.int32)
        mask = np.zeros(length, np.float32)
        mask[start:] = 1.0
        out.append((ids, mask))
    return out


def _direct(params, examples):
    apply = jax.jit(lambda p, ids: GPTNeoX(CFG).apply({"params": p}, ids))
    nll, count, per = 0.0, 0.0, []
    for ids, mask in examples:
        logits = np.asarray(apply(params, ids[None]), np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)) \
            - logits.max(-1, keepdims=True)
        token_nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        w = mask[1:]
        nll += (token_nll * w).sum()
        count += w.sum()
        per.append((token_nll * w).sum() / w.sum())
    return math.exp(nll / count), count, per


def test_matches_direct_computation_and_batching():
    params, examples = _params(), _examples()
    expect, tokens, per = _direct(params, examples)
    r = perplexity(CFG, params, examples, batch_size=2, bucket=16)
    assert r["perplexity"] == pytest.approx(expect, rel=1e-5)
    assert r["tokens"] == tokens == 6 + 8 + 10 and r["examples"] == 3
    np.testing.assert_allclose(r["per_example_nll"], per, rtol=1e-5)
    # Batch composition and padding length do not change anything.
    again = perplexity(CFG, params, examples, batch_size=4, bucket=32)
    assert again["perplexity"] == pytest.approx(r["perplexity"], rel=1e-5)
    # Only response tokens count: changing a prompt token's target changes nothing scored except
    # through conditioning, while masking everything but the last token changes the count.
    last_only = [(ids, np.eye(len(ids), dtype=np.float32)[-1]) for ids, _ in examples]
    assert perplexity(CFG, params, last_only, batch_size=4, bucket=32)["tokens"] == 3


def test_uniform_model_has_vocab_perplexity_and_skips():
    params = _params()
    params["embed_out"]["kernel"] = np.zeros_like(params["embed_out"]["kernel"])
    examples = _examples()
    long = (np.zeros(80, np.int32), np.ones(80, np.float32))
    unscored = (np.ones(8, np.int32), np.zeros(8, np.float32))
    r = perplexity(CFG, params, examples + [long, unscored], batch_size=4, bucket=32)
    assert r["perplexity"] == pytest.approx(CFG.vocab_size, rel=1e-5)
    assert r["skipped"] == {"no_scored_tokens": 1, "too_long": 1}
    assert math.isnan(r["per_example_nll"][3]) and math.isnan(r["per_example_nll"][4])
    with pytest.raises(ValueError, match="no example has a scored"):
        perplexity(CFG, params, [unscored])
    with pytest.raises(ValueError, match="example 0: ids"):
        perplexity(CFG, params, [(np.zeros(3, np.int32), np.zeros(4, np.float32))])
