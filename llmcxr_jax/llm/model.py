"""GPT-NeoX in Flax linen, layer-scanned, with logical axis names and an optional KV cache.

Parameter layout follows transformers' `GPTNeoXForCausalLM` so import/export is a reshape:

    embed_in/embedding                         [vocab, embed]
    layers/input_layernorm/{scale,bias}        [layers, embed]
    layers/post_attention_layernorm/{...}      [layers, embed]
    layers/attention/query_key_value/kernel    [layers, embed, heads, 3, head_dim]  (HF's per-head
    layers/attention/query_key_value/bias      [layers, heads, 3, head_dim]          q,k,v interleave)
    layers/attention/dense/{kernel,bias}       [layers, heads, head_dim, embed], [layers, embed]
    layers/mlp/dense_h_to_4h/{kernel,bias}     [layers, embed, mlp], [layers, mlp]
    layers/mlp/dense_4h_to_h/{kernel,bias}     [layers, mlp, embed], [layers, embed]
    final_layer_norm/{scale,bias}              [embed]
    embed_out/kernel                           [embed, vocab]

Attention masking is expressed with segment ids (0 = padding, never attended) plus causality over
buffer slots, which covers plain padding, packed examples and the KV cache with left padding alike.
Rotary positions are given separately (`positions`), so packed segments and left-padded prompts
each start at position 0.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llmcxr_jax.configs import ModelConfig

Array = jax.Array
_NEG_INF = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` buffer slots.

    `segment_ids[b, s]` is the segment of the token in slot s (0 = empty or padding); `index` is the
    next slot to write. All sequences of a batch share `index` (prompts are left-padded).
    """

    k: Array  # [layers, batch, max_len, heads, head_dim]
    v: Array
    segment_ids: Array  # [batch, max_len] int32
    index: Array  # [] int32

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> "KVCache":
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (config.num_layers, batch, max_len, config.num_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def _dense_init(config: ModelConfig, names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _zeros(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def rotary_tables(positions: Array, rotary_dim: int, base: float) -> tuple[Array, Array]:
    """cos/sin tables [batch, length, rotary_dim] for GPT-NeoX's rotate-half rotary embedding."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first `rotary_dim` features of each head of x [batch, length, heads, head_dim]."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot = (x_rot.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([x_rot, x_pass], axis=-1)


def attention_mask(q_slots: Array, q_segments: Array, kv_slots: Array, kv_segments: Array) -> Array:
    """[batch, 1, q, kv] bool: causal over buffer slots, same non-zero segment only."""
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
    return (causal & same)[:, None]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax attention in fp32; q [b, q, h, d], k/v [b, kv, h, d], mask [b, 1, q, kv]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def causal_blocked_attention(q: Array, k: Array, v: Array, mask: Array, chunk: int) -> Array:
    """`dot_product_attention` for queries and keys in the same slots (no cache), computed in
    blocks of `chunk` query rows: block i attends to keys [0, end of block i) only, since causality
    masks the rest anyway. Fewer FLOPs and softmax work than one dense masked product; equal
    outputs on every row that attends to anything (fully masked padding rows are garbage in both).
    """
    length = q.shape[1]
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        outs.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end],
                                          mask[:, :, start:end, :end]))
    return jnp.concatenate(outs, axis=1)


class Projection(nn.Module):
    """A multi-axis linear map (kernel [*in_shape, *out_shape]) contracting x's trailing in-axes.

    Unlike `nn.DenseGeneral`, the kernel is created in its final shape, so its logical
    partitioning applies to every axis (DenseGeneral initialises a flattened 2-D kernel).
    The product itself is one 2-D matmul, [tokens, prod(in_shape)] x [prod(in_shape),
    prod(out_shape)]: x's leading axes merge into one (batch is the major one, so its sharding
    carries over), and so do the kernel's. XLA:CPU computes the weight gradient of a 2-D dot
    much faster than that of a dot contracting over both batch and length (pythia-70m's LM head
    fwd+bwd on one core: 10.3 s vs 12.2 s); on TPU and GPU the reshapes are free.
    """

    config: ModelConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kernel = self.param("kernel", _dense_init(cfg, self.in_names + self.out_names),
                            self.in_shape + self.out_shape, pdtype)
        lead = x.shape[:x.ndim - len(self.in_shape)]
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        y = jnp.dot(x.reshape(math.prod(lead), n_in).astype(dtype),
                    kernel.reshape(n_in, n_out).astype(dtype))
        if self.use_bias:
            bias = self.param("bias", _zeros(self.out_names), self.out_shape, pdtype)
            y = y + bias.reshape(n_out).astype(dtype)
        return y.reshape(lead + self.out_shape)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, q_slots: Array, segment_ids: Array,
                 k_cache: Array | None, v_cache: Array | None, kv_segments: Array | None,
                 cache_index: Array | None) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        qkv = Projection(cfg, in_shape=(cfg.hidden_size,),
                         out_shape=(cfg.num_heads, 3, cfg.head_dim),
                         in_names=("embed",), out_names=("heads", "qkv", "kv"),
                         use_bias=cfg.attention_bias, name="query_key_value")(x)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "act_kv"))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if k_cache is None:
            kv_slots, kv_segments = q_slots, segment_ids
            new_cache = None
        else:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            kv_slots = jnp.broadcast_to(jnp.arange(k.shape[1]), (k.shape[0], k.shape[1]))
            new_cache = (k, v)
        mask = attention_mask(q_slots, segment_ids, kv_slots, kv_segments)
        if k_cache is None and 0 < cfg.attention_chunk < q.shape[1]:
            out = causal_blocked_attention(q, k, v, mask, cfg.attention_chunk)
        else:
            out = dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask)
        out = Projection(cfg, in_shape=(cfg.num_heads, cfg.head_dim),
                         out_shape=(cfg.hidden_size,), in_names=("heads", "kv"),
                         out_names=("embed",), use_bias=cfg.attention_bias, name="dense")(out)
        return out, new_cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = Projection(cfg, in_shape=(cfg.hidden_size,), out_shape=(cfg.intermediate_size,),
                       in_names=("embed",), out_names=("mlp",), name="dense_h_to_4h")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        h = jax.nn.gelu(h, approximate=False)
        return Projection(cfg, in_shape=(cfg.intermediate_size,), out_shape=(cfg.hidden_size,),
                          in_names=("mlp",), out_names=("embed",), name="dense_4h_to_h")(h)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype), scale_init=_ones(("embed",)),
                        bias_init=_zeros(("embed",)), name=name)


class Block(nn.Module):
    """One GPT-NeoX layer; the scan carry is the residual stream, the cache slices are scanned."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, k_cache: Array | None, v_cache: Array | None, cos: Array,
                 sin: Array, q_slots: Array, segment_ids: Array, kv_segments: Array | None,
                 cache_index: Array | None) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        attn_out, new_cache = Attention(cfg, name="attention")(
            _layer_norm(cfg, "input_layernorm")(x), cos, sin, q_slots, segment_ids, k_cache,
            v_cache, kv_segments, cache_index)
        mlp = MLP(cfg, name="mlp")
        if cfg.use_parallel_residual:
            x = x + attn_out + mlp(_layer_norm(cfg, "post_attention_layernorm")(x))
        else:
            x = x + attn_out
            x = x + mlp(_layer_norm(cfg, "post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_cache


def _remat_policy(name: str) -> Any:
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class GPTNeoX(nn.Module):
    """GPT-NeoX causal LM.

    Call with `input_ids` [batch, length]; `positions` (rotary positions, default 0..length-1) and
    `segment_ids` (0 = padding, default all 1) of the same shape. Without `cache` it returns logits
    [batch, length, vocab]; with a `KVCache` it writes the new tokens at `cache.index` and returns
    `(logits, new_cache)`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array | None = None,
                 segment_ids: Array | None = None,
                 cache: KVCache | None = None) -> Array | tuple[Array, KVCache]:
        cfg = self.config
        batch, length = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=_dense_init(cfg, ("vocab", "embed")), name="embed_in")
        x = embed(input_ids)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        cos, sin = rotary_tables(positions, cfg.rotary_dim, cfg.rotary_emb_base)

        if cache is None:
            q_slots = jnp.broadcast_to(jnp.arange(length), (batch, length))
            k_cache = v_cache = kv_segments = cache_index = None
        else:
            q_slots = cache.index + jnp.broadcast_to(jnp.arange(length), (batch, length))
            kv_segments = jax.lax.dynamic_update_slice(
                cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
            k_cache, v_cache, cache_index = cache.k, cache.v, cache.index

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=_remat_policy(cfg.remat_policy), prevent_cse=False)
        cache_axis = nn.broadcast if cache is None else 0
        layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(cache_axis, cache_axis) + (nn.broadcast,) * 6, length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        x, new_kv = layers(x, k_cache, v_cache, cos, sin, q_slots, segment_ids, kv_segments,
                           cache_index)

        x = _layer_norm(cfg, "final_layer_norm")(x)
        logits = Projection(cfg, in_shape=(cfg.hidden_size,), out_shape=(cfg.vocab_size,),
                            in_names=("embed",), out_names=("vocab",), use_bias=False,
                            name="embed_out")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        if cache is None:
            return logits
        new_cache = KVCache(k=new_kv[0], v=new_kv[1], segment_ids=kv_segments,
                            index=cache.index + length)
        return logits, new_cache


def init_params(config: ModelConfig, rng: Array, length: int = 8) -> Any:
    """Unboxed params (no sharding); see llmcxr_jax.parallel for sharded initialisation."""
    ids = jnp.zeros((1, length), jnp.int32)
    return nn.unbox(GPTNeoX(config).init(rng, ids))["params"]


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
