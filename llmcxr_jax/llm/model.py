"""GPT-NeoX in Flax linen: the one forward pass that training, prefill and decoding all run.

`GPTNeoX(config)(input_ids, positions, segment_ids)` returns logits. Given a `KVCache` it also
writes the new tokens' keys and values at `cache.index` and returns `(logits, new_cache)`: one
call prefills a prompt, a call with one token per row is a decode step (`generate.py`). Without
a cache (training, scoring) the layers run under `nn.scan` over their stacked parameters
(optionally rematerialised); with one they run unrolled, each layer on its slice of the same
parameters and its own cache array, so a decode loop updates every layer's cache in place.

The parameter tree (`Params`) follows transformers' `GPTNeoXForCausalLM`, so import/export is a
reshape. Attention masking is expressed with segment ids (0 = padding, never attended) plus
causality over buffer slots, which covers plain padding, packed examples and the cache with left
padding alike. Rotary positions are given separately (`positions`), so packed segments and
left-padded prompts each start at position 0.
"""

from __future__ import annotations

import math
from typing import Any, NotRequired, TypedDict

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.parallel.rules import gathered, logical_axis_size

Array = jax.Array
_NEG_INF = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


class LayerNormParams(TypedDict):
    scale: Array  # [embed]
    bias: Array  # [embed]


class ProjectionParams(TypedDict, total=False):
    kernel: Array  # [*in_shape, *out_shape]
    bias: Array  # [*out_shape]; absent without a bias


class AttentionParams(TypedDict):
    query_key_value: ProjectionParams  # [embed, heads, 3, head_dim]: HF's per-head q,k,v interleave
    dense: ProjectionParams  # [heads, head_dim, embed]


class MLPParams(TypedDict):
    dense_h_to_4h: ProjectionParams  # [embed, mlp]
    dense_4h_to_h: ProjectionParams  # [mlp, embed]


class LayerParams(TypedDict):
    """One layer's parameters; in `Params.layers` every leaf has a leading [layers] axis."""

    input_layernorm: LayerNormParams
    post_attention_layernorm: LayerNormParams
    attention: AttentionParams
    mlp: MLPParams


class Params(TypedDict):
    """`GPTNeoX`'s parameter tree (flax's params dict, unboxed): the names and shapes the
    checkpoints, the HF mapping and the serving exports store."""

    embed_in: dict[str, Array]  # {"embedding": [vocab, embed]}
    layers: LayerParams  # stacked over layers (`with_split_layers`: one tree per layer)
    final_layer_norm: LayerNormParams
    embed_out: ProjectionParams  # {"kernel": [embed, vocab]}
    # Only with `ModelConfig.image_position_rows` (not GPT-NeoX): [rows, embed], added to each
    # image token's embedding by its index within its image.
    image_position: NotRequired[Array]


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` buffer slots.

    One array per layer, [batch * heads, max_len, head_dim], rather than one stacked over layers
    and [batch, slots, heads, dim]: a decode loop then updates each in place and the attention
    reads it without a copy (XLA on CPU copies a scanned layer's slice, transposes a
    slots-before-heads cache for the dots, and copies a cache with a size-1 batch dim around the
    in-place update). `segment_ids[b, s]` is the segment of the token in slot s (0 = empty or
    padding); `index` is the next slot to write, shared by all rows (prompts are left-padded).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    segment_ids: Array  # [batch, max_len] int32
    index: Array  # [] int32
    # [batch] int32: image tokens in a row at the end of what the cache holds (the index of the
    # next image token within its image, `image_position_rows`).
    image_run: Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (batch * config.num_heads, max_len, config.head_dim)
        zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
        return cls(k=zeros, v=zeros, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32), image_run=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


@flax.struct.dataclass
class LayerInputs:
    """What every layer reads besides the residual stream: the same for all layers of a call."""

    cos: Array  # [batch, length, rotary_dim]
    sin: Array
    mask: Array  # [batch, 1, length, kv slots] bool (`attention_mask`)
    cache_index: Array | None = None  # [] int32: the first new token's cache slot (cached calls)


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
    """Softmax attention in fp32 over any leading axes: q [..., q, d], k/v [..., kv, d], mask
    broadcastable to [..., q, kv] ([b, 1, q, kv] for [b, h, ...] inputs)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, v)


def causal_blocked_attention(q: Array, k: Array, v: Array, mask: Array, chunk: int) -> Array:
    """`dot_product_attention` for queries and keys in the same slots (no cache), computed in
    blocks of `chunk` query rows: block i attends to keys [0, end of block i) only, since causality
    masks the rest anyway. Fewer FLOPs and softmax work than one dense masked product; equal
    outputs on every row that attends to anything (fully masked padding rows are garbage in both).
    """
    length = q.shape[2]
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        outs.append(dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                          mask[:, :, start:end, :end]))
    return jnp.concatenate(outs, axis=2)


class Projection(nn.Module):
    """A multi-axis linear map (kernel [*in_shape, *out_shape]) contracting x's trailing in-axes.

    Unlike `nn.DenseGeneral`, the kernel is created in its final shape, so its logical
    partitioning applies to every axis (DenseGeneral initialises a flattened 2-D kernel).
    The product itself is one 2-D matmul, [tokens, prod(in_shape)] x [prod(in_shape),
    prod(out_shape)]: x's leading axes merge into one (batch is the major one, so its sharding
    carries over), and so do the kernel's. XLA:CPU computes the weight gradient of a 2-D dot
    faster than that of a dot contracting over both batch and length (`bench/train_step.py`);
    on TPU and GPU the reshapes are free.

    With `partial_groups` g > 1 the contraction is left unfinished: the first in-axis is cut into
    g equal slices and the result is each slice's product, [..., g, *out_shape] (the bias in the
    first), for the caller to add to other partial sums before it sums them (`Block`).

    Under remat the kernel is gathered (FSDP) at one point, its cast to the compute dtype, which
    the recomputed forward and the backward then both read: left to itself XLA may gather it for
    each (seen: `dense_h_to_4h` on a tensor-parallel mesh). Without remat it is not: the backward
    would keep every layer's gathered kernel alive instead of its shard.
    """

    config: ModelConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    use_bias: bool = True
    partial_groups: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kernel = self.param("kernel", _dense_init(cfg, self.in_names + self.out_names),
                            self.in_shape + self.out_shape, pdtype)
        kernel = kernel.astype(dtype)
        if cfg.remat_policy != "none":
            kernel = nn.with_logical_constraint(kernel, gathered(self.in_names + self.out_names))
        lead = x.shape[:x.ndim - len(self.in_shape)]
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        x = x.reshape(math.prod(lead), n_in).astype(dtype)
        g = self.partial_groups
        if g == 1:
            y = jnp.dot(x, kernel.reshape(n_in, n_out))
        else:
            y = jnp.einsum("tgi,gio->tgo", x.reshape(-1, g, n_in // g),
                           kernel.reshape(g, n_in // g, n_out))
        if self.use_bias:
            bias = self.param("bias", _zeros(self.out_names), self.out_shape, pdtype)
            bias = bias.reshape(n_out).astype(dtype)
            y = y + (bias if g == 1 else jnp.where(jnp.arange(g)[:, None] == 0, bias, 0))
        return y.reshape(lead + ((g,) if g > 1 else ()) + self.out_shape)


def _heads_first(x: Array) -> Array:
    """[batch, length, heads, dim] -> [batch, heads, length, dim] (the attention's layout)."""
    return x.transpose(0, 2, 1, 3)


def _write_cache(cache: Array, new: Array, index: Array) -> Array:
    """`new` [batch, heads, length, dim] into `cache` [batch * heads, max_len, dim] at `index`."""
    b, h, length, d = new.shape
    return jax.lax.dynamic_update_slice(cache, new.reshape(b * h, length, d).astype(cache.dtype),
                                        (0, index, 0))


class Attention(nn.Module):
    """Self-attention of the new tokens: over themselves, or over the cache they are written to.
    With `partial_groups` > 1 the output is the `dense` projection's partial sums."""

    config: ModelConfig
    partial_groups: int = 1

    @nn.compact
    def __call__(self, x: Array, inputs: LayerInputs, kv: tuple[Array, Array] | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        qkv = Projection(cfg, in_shape=(cfg.hidden_size,),
                         out_shape=(cfg.num_heads, 3, cfg.head_dim),
                         in_names=("embed",), out_names=("heads", "qkv", "kv"),
                         use_bias=cfg.attention_bias, name="query_key_value")(x)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "act_kv"))
        q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
        q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
        if kv is not None:
            # In the cache's own layout, batch and heads merged: a [batch, heads, ...] view of
            # the cache would be copied every step once batch > 1.
            kv = (_write_cache(kv[0], k, inputs.cache_index),
                  _write_cache(kv[1], v, inputs.cache_index))
            batch, heads, length, head_dim = q.shape
            mask = jnp.broadcast_to(inputs.mask, (batch, heads) + inputs.mask.shape[2:])
            out = dot_product_attention(q.reshape(batch * heads, length, head_dim),
                                        kv[0].astype(dtype), kv[1].astype(dtype),
                                        mask.reshape(batch * heads, *mask.shape[2:]))
            out = out.reshape(batch, heads, length, head_dim)
        elif 0 < cfg.attention_chunk < q.shape[2]:
            out = causal_blocked_attention(q, k, v, inputs.mask, cfg.attention_chunk)
        else:
            out = dot_product_attention(q, k, v, inputs.mask)
        out = Projection(cfg, in_shape=(cfg.num_heads, cfg.head_dim),
                         out_shape=(cfg.hidden_size,), in_names=("heads", "kv"),
                         out_names=("embed",), use_bias=cfg.attention_bias,
                         partial_groups=self.partial_groups, name="dense")(_heads_first(out))
        return out, kv


class MLP(nn.Module):
    """With `partial_groups` > 1 the output is `dense_4h_to_h`'s partial sums."""

    config: ModelConfig
    partial_groups: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = Projection(cfg, in_shape=(cfg.hidden_size,), out_shape=(cfg.intermediate_size,),
                       in_names=("embed",), out_names=("mlp",), name="dense_h_to_4h")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        h = jax.nn.gelu(h, approximate=False)
        return Projection(cfg, in_shape=(cfg.intermediate_size,), out_shape=(cfg.hidden_size,),
                          in_names=("mlp",), out_names=("embed",),
                          partial_groups=self.partial_groups, name="dense_4h_to_h")(h)


def _output_partial_groups(cfg: ModelConfig) -> int:
    """Into how many partial sums a parallel-residual block leaves its two output projections
    (attention `dense`, `dense_4h_to_h`): one per tensor-parallel shard of their contracted
    axes (`heads`, `mlp`). Each shard adds its two partial sums and the block reduces them once,
    as Megatron does for GPT-NeoX; XLA reduces each projection as soon as it is computed (two
    all-reduces a layer). 1 without tensor parallelism, a sequential residual, or shards that
    do not split both axes alike."""
    if not cfg.use_parallel_residual:
        return 1
    groups = logical_axis_size("act_heads")
    alike = (groups == logical_axis_size("act_mlp") and cfg.num_heads % groups == 0
             and cfg.intermediate_size % groups == 0)
    return groups if alike else 1


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype), scale_init=_ones(("embed",)),
                        bias_init=_zeros(("embed",)), name=name)


class Block(nn.Module):
    """One GPT-NeoX layer: (residual stream, layer inputs, this layer's cache or None) ->
    (residual stream, updated cache or None)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, inputs: LayerInputs, kv: tuple[Array, Array] | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        groups = _output_partial_groups(cfg)
        attn_out, kv = Attention(cfg, groups, name="attention")(
            _layer_norm(cfg, "input_layernorm")(x), inputs, kv)
        mlp = MLP(cfg, groups, name="mlp")
        if cfg.use_parallel_residual:
            out = attn_out + mlp(_layer_norm(cfg, "post_attention_layernorm")(x))
            if groups > 1:  # [batch, length, groups, embed], a group per tensor shard
                out = nn.with_logical_constraint(
                    out, ("batch", "length", "act_heads", "act_embed")).sum(axis=2)
            x = x + out
        else:
            x = x + attn_out
            x = x + mlp(_layer_norm(cfg, "post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, kv


def _remat_policy(name: str) -> Any:
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class GPTNeoX(nn.Module):
    """GPT-NeoX causal LM (module docstring).

    `input_ids` [batch, length]; `positions` (rotary positions, default 0..length-1) and
    `segment_ids` (0 = padding, default all 1) of the same shape. Returns logits
    [batch, length, vocab] (`last_only`: [batch, 1, vocab], all a prefill needs; `logits_at`
    [batch, k] slot indices: [batch, k, vocab] at those slots), and with a `cache` also the cache
    with these tokens written at `cache.index`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array | None = None,
                 segment_ids: Array | None = None, cache: KVCache | None = None, *,
                 last_only: bool = False, logits_at: Array | None = None
                 ) -> Array | tuple[Array, KVCache]:
        cfg = self.config
        batch, length = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=_dense_init(cfg, ("vocab", "embed")), name="embed_in")
        # The lookup's own layout first (parallel/rules.py, "lookup_batch"), then the batch's.
        x = nn.with_logical_constraint(embed(input_ids), ("lookup_batch", "length", "embed"))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        image_run = cache.image_run if cache is not None else None
        if cfg.image_position_rows:
            # Where an image token sits in its image (row and column of the VQ-GAN grid): rotary
            # positions only give distances, and the image's start moves with the prompt.
            first, count = cfg.image_ids
            is_image = (input_ids >= first) & (input_ids < first + count)
            carried = image_run if image_run is not None else jnp.zeros((batch,), jnp.int32)
            index = image_run_index(is_image, carried)
            table = self.param("image_position", _dense_init(cfg, (None, "embed")),
                               (cfg.image_position_rows, cfg.hidden_size),
                               jnp.dtype(cfg.param_dtype))
            rows = jnp.take(table, jnp.clip(index, 0, cfg.image_position_rows - 1), axis=0)
            x = x + jnp.where(is_image[..., None], rows.astype(x.dtype), 0)
            if image_run is not None:
                image_run = jnp.where(is_image[:, -1], index[:, -1] + 1, 0)
        cos, sin = rotary_tables(positions, cfg.rotary_dim, cfg.rotary_emb_base)
        slots = jnp.broadcast_to(jnp.arange(length), (batch, length))

        if cache is None:
            mask = attention_mask(slots, segment_ids, slots, segment_ids)
            block = Block
            if cfg.remat_policy != "none":
                block = nn.remat(Block, policy=_remat_policy(cfg.remat_policy), prevent_cse=False)
            layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=nn.broadcast, length=cfg.num_layers,
                unroll=1 if cfg.scan_layers else cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
            x, _ = layers(x, LayerInputs(cos=cos, sin=sin, mask=mask))
        else:
            # The same `Block` on each layer's slice of the scanned parameters (`split_layers`),
            # unrolled: every layer keeps its own cache array (`KVCache`).
            kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids,
                                                       (0, cache.index))
            kv_slots = jnp.broadcast_to(jnp.arange(cache.max_len), (batch, cache.max_len))
            mask = attention_mask(cache.index + slots, segment_ids, kv_slots, kv_segments)
            inputs = LayerInputs(cos=cos, sin=sin, mask=mask, cache_index=cache.index)
            layers = self.variables["params"]["layers"]
            if not isinstance(layers, tuple):
                layers = split_layers(nn.unbox(layers), cfg.num_layers)
            block = Block(cfg, parent=None)
            keys, values = [], []
            for layer, kv in zip(layers, zip(cache.k, cache.v)):
                x, (k, v) = block.apply({"params": layer}, x, inputs, kv)
                keys.append(k)
                values.append(v)
            cache = KVCache(k=tuple(keys), v=tuple(values), segment_ids=kv_segments,
                            index=cache.index + length, image_run=image_run)

        if last_only:
            x = x[:, -1:]
        if logits_at is not None:
            # Logits at these slots only ([batch, k] indices): training needs them only where
            # the loss is, and the vocabulary projection and its softmax are a large share of
            # a small model's step.
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        x = _layer_norm(cfg, "final_layer_norm")(x)
        logits = Projection(cfg, in_shape=(cfg.hidden_size,), out_shape=(cfg.vocab_size,),
                            in_names=("embed",), out_names=("vocab",), use_bias=False,
                            name="embed_out")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return logits if cache is None else (logits, cache)


def image_run_index(is_image: Array, carried: Array) -> Array:
    """Each token's index within its run of consecutive image tokens, [batch, length] int32
    (meaningless at other tokens); `carried` [batch]: the image tokens right before the first."""
    t = jnp.arange(is_image.shape[1], dtype=jnp.int32)[None, :]
    last_other = jax.lax.cummax(jnp.where(is_image, -(carried[:, None] + 1), t), axis=1)
    return t - last_other - 1


def split_layers(layers: LayerParams, num_layers: int) -> tuple[LayerParams, ...]:
    """The stacked `Params.layers` as one tree per layer."""
    return tuple(jax.tree.map(lambda p, i=i: p[i], layers) for i in range(num_layers))


def with_split_layers(params: Params, num_layers: int) -> Params:
    """`params` with `layers` split (`split_layers`), which the cached forward takes as they are.

    A decode loop splits them once, before the loop: XLA does not hoist the slices of the stacked
    weights out of a `while_loop`, so every step would copy every layer's weights.
    """
    return {**params, "layers": split_layers(params["layers"], num_layers)}


def init_params(config: ModelConfig, rng: Array, length: int = 8) -> Params:
    """Unboxed params (no sharding); see llmcxr_jax.parallel for sharded initialisation."""
    ids = jnp.zeros((1, length), jnp.int32)
    return nn.unbox(GPTNeoX(config).init(rng, ids))["params"]


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
