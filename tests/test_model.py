"""The Flax GPT-NeoX against transformers' PyTorch model: padding, packing, remat, bf16.

(Cached decoding against full recomputation belongs to the generation tests.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmcxr_jax.configs import REMAT_POLICIES, ModelConfig  # noqa: E402
from llmcxr_jax.llm import hf_mapping  # noqa: E402
from llmcxr_jax.llm.model import GPTNeoX  # noqa: E402

VOCAB, T = 128, 11
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=128, rotary_pct=0.25, max_position_embeddings=64)


@pytest.fixture(scope="module")
def reference():
    """(transformers model, our params) with the same random weights."""
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=CONFIG.hidden_size, num_hidden_layers=CONFIG.num_layers,
        num_attention_heads=CONFIG.num_heads, intermediate_size=CONFIG.intermediate_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                         "partial_rotary_factor": CONFIG.rotary_pct},
        max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("layernorm.weight") else 0.0, 0.2)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = hf_mapping.params_from_state_dict(state, CONFIG, to_array=jnp.asarray)
    return model, params


@functools.lru_cache(maxsize=None)
def _forward(config: ModelConfig):
    return jax.jit(lambda p, ids, pos, seg: GPTNeoX(config).apply({"params": p}, ids, pos, seg))


def _hf_logits(model, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(position_ids, dtype=torch.long)
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.numpy()


def _padded_batch(left: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    """ids and 0/1 mask [3, T] for lengths 11, 7, 4, padded on the left or on the right."""
    ids = rng.integers(2, VOCAB, (3, T)).astype(np.int32)
    mask = np.zeros((3, T), np.int32)
    for b, n in enumerate((11, 7, 4)):
        if left:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return np.where(mask == 1, ids, 1), mask


# Attention in one dense product, and in blocks of 4 query rows (11 = 4 + 4 + 3: causality lets
# each block skip the keys after it; the uneven last block is covered too).
BLOCKED = dataclasses.replace(CONFIG, attention_chunk=4)
ATTENTION = pytest.mark.parametrize("config", [dataclasses.replace(CONFIG, attention_chunk=0),
                                               BLOCKED], ids=["dense", "blocked"])


@ATTENTION
@pytest.mark.parametrize("left", [True, False], ids=["left_padding", "right_padding"])
def test_padding_matches_transformers(reference, left, config):
    model, params = reference
    ids, mask = _padded_batch(left, np.random.default_rng(int(left)))
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)  # as HF generate
    ours = np.asarray(_forward(config)(params, ids, positions, mask))
    ref = _hf_logits(model, ids, attention_mask=mask, position_ids=positions)
    valid = mask == 1
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    assert np.isfinite(ours).all()  # fully padded rows stay NaN-free


@ATTENTION
def test_packed_sequences_match_each_alone(reference, config):
    model, params = reference
    rng = np.random.default_rng(3)
    a, b = rng.integers(2, VOCAB, 5), rng.integers(2, VOCAB, 6)
    ids = np.ones((3, T), np.int32)
    seg = np.zeros((3, T), np.int32)
    pos = np.zeros((3, T), np.int32)
    ids[0], seg[0], pos[0] = np.concatenate([a, b]), [1] * 5 + [2] * 6, [*range(5), *range(6)]
    ids[1, :5], seg[1, :5], pos[1, :5] = a, 1, np.arange(5)  # a alone, right-padded
    ids[2, :6], seg[2, :6], pos[2, :6] = b, 1, np.arange(6)  # b alone
    out = np.asarray(_forward(config)(params, ids, pos, seg))
    np.testing.assert_allclose(out[0, :5], out[1, :5], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0, 5:], out[2, :6], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0, 5:], _hf_logits(model, b[None])[0], atol=1e-4, rtol=0)


def test_logits_at_chosen_slots_equal_transformers_there(reference):
    model, params = reference
    rng = np.random.default_rng(4)
    ids = rng.integers(2, VOCAB, (2, T)).astype(np.int32)
    slots = np.array([[0, 3, 10, 3], [9, 8, 1, 5]], np.int32)  # any order, repeats allowed
    ours = np.asarray(jax.jit(lambda p, i, s: GPTNeoX(CONFIG).apply({"params": p}, i,
                                                                    logits_at=s))(
        params, ids, slots))
    assert ours.shape == (2, 4, VOCAB)
    ref = _hf_logits(model, ids)
    np.testing.assert_allclose(ours, np.take_along_axis(ref, slots[..., None], axis=1),
                               atol=1e-4, rtol=0)


def _loss_and_grads(config: ModelConfig, params, ids):
    def loss(p):
        logits = GPTNeoX(config).apply({"params": p}, ids)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    # A lower XLA optimisation level halves these compiles; every policy gets the same level.
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile(
        {"xla_backend_optimization_level": 0})
    return compiled(params)


def test_remat_unrolled_layers_and_blocked_attention_give_identical_loss_and_grads(reference):
    _, params = reference
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 8)).astype(np.int32)
    base_loss, base_grads = _loss_and_grads(CONFIG, params, ids)
    variants = {p: dataclasses.replace(CONFIG, remat_policy=p) for p in REMAT_POLICIES[1:]}
    variants["unrolled layers"] = dataclasses.replace(CONFIG, scan_layers=False)
    variants["attention in blocks of 3 rows"] = dataclasses.replace(CONFIG, attention_chunk=3)
    for policy, config in variants.items():
        loss, grads = _loss_and_grads(config, params, ids)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6, err_msg=policy)
        jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7,
                                                             err_msg=policy), grads, base_grads)
    assert float(jnp.abs(base_grads["layers"]["mlp"]["dense_h_to_4h"]["kernel"]).max()) > 0


def test_bf16_compute_is_close_to_fp32(reference):
    model, params = reference
    ids, mask = _padded_batch(False, np.random.default_rng(5))
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    fp32 = np.asarray(_forward(CONFIG)(params, ids, pos, mask))
    bf16_cfg = dataclasses.replace(CONFIG, dtype="bfloat16")
    bf16 = _forward(bf16_cfg)(params, ids, pos, mask)
    assert bf16.dtype == jnp.bfloat16
    bf16 = np.asarray(bf16.astype(jnp.float32))
    valid = mask == 1
    err = np.abs(bf16[valid] - fp32[valid]).max()
    assert err < 0.05 * np.abs(fp32[valid]).max(), err
    # Same prediction nearly everywhere.
    agree = (bf16[valid].argmax(-1) == fp32[valid].argmax(-1)).mean()
    assert agree > 0.9, agree
