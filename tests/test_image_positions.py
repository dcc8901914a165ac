"""The learned image-position table (`ModelConfig.image_position_rows`, `RunConfig.image_positions`):
each image token's index within its image, the same through the cached decode as in one full
forward, and the run config, exports and starting params that carry it."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm import hf_io
from llmcxr_jax.llm.model import GPTNeoX, KVCache, image_run_index
from llmcxr_jax.train import run_config as rc

FIRST, COUNT, ROWS = 40, 16, 6  # image ids 40..55, images of 6 tokens
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64, initializer_range=0.2, image_position_rows=ROWS,
                     image_ids=(FIRST, COUNT))


def _runs_by_loop(is_image: np.ndarray, carried: np.ndarray) -> np.ndarray:
    """The index within the current run of image tokens, counted one token at a time."""
    out = np.zeros(is_image.shape, np.int64)
    for b in range(is_image.shape[0]):
        run = int(carried[b])
        for t in range(is_image.shape[1]):
            out[b, t] = run if is_image[b, t] else -1
            run = run + 1 if is_image[b, t] else 0
    return out


def test_index_within_the_image_counts_runs_and_carries_across_calls():
    rng = np.random.default_rng(0)
    is_image = rng.random((5, 23)) < 0.7
    carried = np.array([0, 3, 0, 5, 1])
    got = np.asarray(image_run_index(jnp.asarray(is_image), jnp.asarray(carried)))
    want = _runs_by_loop(is_image, carried)
    np.testing.assert_array_equal(got[is_image], want[is_image])


def _init(config: ModelConfig, seed: int = 0):
    init = jax.jit(lambda key: GPTNeoX(config).init(key, jnp.zeros((1, 4), jnp.int32)))
    return nn.unbox(init(jax.random.key(seed)))["params"]


def _sequence() -> np.ndarray:
    """Two rows: text, an image, text, then an image cut by the prefill / decode boundary."""
    text = lambda n, s: list(range(s, s + n))  # noqa: E731  (ids < FIRST)
    image = lambda s: [FIRST + (s + k) % COUNT for k in range(ROWS)]  # noqa: E731
    rows = [text(3, 1) + image(0) + text(2, 9) + image(5),
            text(1, 20) + image(3) + text(4, 5) + image(11) + text(2, 30)]
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], np.int32)


def test_cached_decode_equals_the_full_forward_and_the_table_is_used():
    params = _init(CONFIG)
    ids = _sequence()
    batch, length = ids.shape
    model = GPTNeoX(CONFIG)
    full = np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids))(params))

    split = 15  # inside the second row's last image (and the first's)

    @jax.jit
    def cached(params):
        logits, cache = model.apply({"params": params}, ids[:, :split], None, None,
                                    KVCache.init(CONFIG, batch, length))
        steps = [logits]
        for t in range(split, length):
            positions = jnp.full((batch, 1), t, jnp.int32)
            step, cache = model.apply({"params": params}, ids[:, t:t + 1], positions, None, cache)
            steps.append(step)
        return jnp.concatenate(steps, 1)

    np.testing.assert_allclose(np.asarray(cached(params)), full, rtol=1e-4, atol=1e-4)

    # Without the table (the same weights otherwise) the logits change exactly from the first
    # image token on: text-only prefixes do not see it.
    plain = dict(params)
    del plain["image_position"]
    plain_cfg = dataclasses.replace(CONFIG, image_position_rows=0, image_ids=(0, 0))
    without = np.asarray(GPTNeoX(plain_cfg).apply({"params": plain}, ids))
    is_image = (ids >= FIRST) & (ids < FIRST + COUNT)
    for b in range(batch):
        first = int(np.argmax(is_image[b]))
        np.testing.assert_allclose(without[b, :first], full[b, :first], rtol=1e-5, atol=1e-5)
        assert np.abs(without[b, first:] - full[b, first:]).max(axis=-1).min() > 1e-3


def test_the_run_derives_the_table_from_its_vqgan_and_vocabulary():
    cfg = rc.apply_overrides(rc.run_preset("phantom"), ["image_positions=learned"])
    model = rc.resolve(cfg).model
    assert model.image_position_rows == 64  # phantom-f8-64: 8 x 8 codes
    assert model.image_ids == (cfg.vocab_text_ids, 1024)
    off = rc.apply_overrides(rc.run_preset("phantom"), ["image_positions=none"])
    assert rc.resolve(off).model.image_position_rows == 0
    assert rc.resolve(off).model.image_ids == (0, 0)
    with pytest.raises(ValueError, match="derived, not settable"):
        rc.apply_overrides(cfg, ["model.image_position_rows=8"])
    with pytest.raises(ValueError, match="own tokenizer"):
        rc.apply_overrides(rc.run_preset("dolly-v2-3b"), ["image_positions=learned"])


def test_transformers_export_refuses_the_table(tmp_path):
    from llmcxr_jax.text.vocab import Vocab  # noqa: F401  (the check comes first)
    with pytest.raises(hf_io.HFCheckpointError, match="--format serving"):
        hf_io.export_hf({}, CONFIG, None, tmp_path / "hf")


def test_a_starting_point_without_the_table_gets_one():
    from llmcxr_jax.parallel.mesh import mesh_from_flag
    from llmcxr_jax.train import run
    cfg = rc.resolve(rc.apply_overrides(rc.run_preset("tiny"), ["image_positions=learned"]))
    mesh = mesh_from_flag("-1")
    base = run.init_state(cfg.model, rc.stage_train(cfg, 1), mesh,
                          run.rules_for(cfg.param_sharding)).params
    without = {k: v for k, v in base.items() if k != "image_position"}
    started = run.with_image_positions(cfg, without, mesh)
    assert started["image_position"].shape == (cfg.model.image_position_rows,
                                               cfg.model.hidden_size)
    assert started["embed_in"] is without["embed_in"]  # the rest as given
    assert run.with_image_positions(cfg, base, mesh) is base
    restored = {**without, "image_position": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
    assert isinstance(run.with_image_positions(cfg, restored, mesh)["image_position"], jax.Array)
    assert run.with_image_positions(rc.resolve(rc.run_preset("tiny")), without, mesh) is without
