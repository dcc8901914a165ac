"""taming-transformers' VQModel (encoder, quantizer, decoder) in Flax linen.

Same architecture and parameter layout as `taming.models.vqgan.VQModel`, so taming checkpoints map
one to one (see `taming_import.py`). Module names mirror taming's state_dict keys with the list
indices folded in: taming `encoder.down.1.block.0.conv1.weight` is Flax
`encoder/down_1_block_0/conv1/kernel`, `decoder.mid.attn_1.q.weight` is `decoder/mid_attn_1/q/kernel`.

Images are NHWC float in [-1, 1]; latents are NHWC. Every parameter carries logical axis names
(`conv_height`, `conv_width`, `conv_in`, `conv_out`, `codebook`, `embed`; see
`llmcxr_jax/parallel/rules.py`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
import jax.numpy as jnp
import flax.linen as nn

from llmcxr_jax.configs import VQGANConfig
from llmcxr_jax.vqgan.quantizer import QuantizerOutput, VectorQuantizer

# The decoder's last conv kernel: taming's adaptive GAN weight takes gradient norms w.r.t. it.
LAST_LAYER_KERNEL_PATH: tuple[str, ...] = ("decoder", "conv_out", "kernel")

CONV_KERNEL_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")

# torch's default Conv2d init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def last_layer_kernel(params: Any) -> jax.Array:
    """The decoder's last conv kernel in a (boxed or plain) VQGAN params tree."""
    node = params
    for key in LAST_LAYER_KERNEL_PATH:
        node = node[key]
    return nn.meta.unbox(node)


def _conv(features: int, kernel: int, cfg: VQGANConfig, *, strides: int = 1,
          padding: Any = None, out_axis: str | None = "conv_out", name: str | None = None) -> nn.Conv:
    """A Conv2d as taming builds it (stride 1 convs pad kernel//2 on every side)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=padding,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(torch_conv_kernel_init, CONV_KERNEL_AXES[:3] + (out_axis,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
        name=name)


class GroupNorm(nn.Module):
    """taming's Normalize: GroupNorm(`config.norm_groups` groups, taming's 32; eps 1e-6, affine)
    over NHWC, stats in float32.

    Same maths as `nn.GroupNorm(use_fast_variance=False)`, but the statistics are reduced per
    channel over the contiguous rows [B, H*W, C] first and then per group: XLA's CPU reduction
    over flax's [B, H*W, G, C/G] layout is far slower (it dominated decode time; README,
    Performance).
    Params: `scale`, `bias` [C].
    """

    config: VQGANConfig
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, c = x.shape[0], x.shape[-1]
        g = cfg.norm_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups")
        pdt = jnp.dtype(cfg.param_dtype)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)), (c,), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), (c,), pdt)
        rows = x.reshape(b, -1, c).astype(jnp.float32)
        count = rows.shape[1] * (c // g)
        mean = jnp.sum(rows, axis=1).reshape(b, g, c // g).sum(-1) / count  # [B, G]
        mean_c = jnp.repeat(mean, c // g, axis=1)[:, None, :]  # [B, 1, C]
        var = jnp.sum(jnp.square(rows - mean_c), axis=1).reshape(b, g, c // g).sum(-1) / count
        inv_c = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), c // g, axis=1)[:, None, :]
        a = inv_c * scale.astype(jnp.float32)  # y = x * a + shift, per batch and channel
        shift = bias.astype(jnp.float32) - mean_c * a
        y = rows * a + shift
        return y.reshape(x.shape).astype(jnp.dtype(cfg.dtype))


def _norm(cfg: VQGANConfig, name: str | None = None) -> GroupNorm:
    return GroupNorm(cfg, name=name)


def swish(x: jax.Array) -> jax.Array:
    """x * sigmoid(x), written with tanh: the same function, faster on XLA:CPU than logistic."""
    return x * (0.5 + 0.5 * jnp.tanh(0.5 * x))


class ResnetBlock(nn.Module):
    """norm -> swish -> conv -> norm -> swish -> dropout -> conv, plus a 1x1 `nin_shortcut`
    when the channel count changes."""

    config: VQGANConfig
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        h = swish(_norm(cfg, "norm1")(x))
        h = _conv(self.out_channels, 3, cfg, name="conv1")(h)
        h = swish(_norm(cfg, "norm2")(h))
        h = nn.Dropout(cfg.dropout, deterministic=not train or cfg.dropout == 0.0)(h)
        h = _conv(self.out_channels, 3, cfg, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, cfg, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1 convs q, k, v, proj_out."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, hgt, wid, c = x.shape
        h = _norm(cfg, "norm")(x)
        q, k, v = (_conv(c, 1, cfg, name=n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hgt, wid, c)
        return x + _conv(c, 1, cfg, name="proj_out")(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after taming's asymmetric zero padding (0 top/left, 1 bottom/right)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(x.shape[-1], 3, self.config, strides=2, padding=((0, 1), (0, 1)), name="conv")(x)


class ConvParams(nn.Module):
    """The kernel [k, k, in, out] and bias [out] of a conv, for modules that apply them their own way."""

    config: VQGANConfig
    in_features: int
    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        pdt = jnp.dtype(self.config.param_dtype)
        k = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(torch_conv_kernel_init, CONV_KERNEL_AXES),
                            (k, k, self.in_features, self.features), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                          (self.features,), pdt)
        return kernel, bias


def _subpixel_taps(w: jax.Array, phase: int, axis: int) -> jax.Array:
    """The 2 taps along `axis` of a 3-tap kernel seen from the low-res grid, for output `phase`:
    nearest x2 maps taps (0, 1, 2) onto input offsets (-1, 0, 0) for phase 0, (0, 0, +1) for 1."""
    t0, t1, t2 = (jnp.take(w, i, axis=axis) for i in range(3))
    return jnp.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], axis=axis)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (param `conv`), computed without the x2 tensor.

    Each of the 4 output phases is a 2x2 conv of the low-res input with taps summed from the 3x3
    kernel (sub-pixel convolution): exactly the same function as taming's interpolate + conv, at
    4/9 of the FLOPs; the phases are then interleaved (depth-to-space).
    """

    config: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel, bias = ConvParams(self.config, c, c, name="conv")()
        dtype = jnp.dtype(self.config.dtype)
        pads = ((1, 0), (0, 1))  # phase 0 reads offsets (-1, 0), phase 1 reads (0, +1)
        rows = []
        for a in range(2):
            ka = _subpixel_taps(kernel, a, 0)  # taps summed in param precision, then cast
            cols = [jax.lax.conv_general_dilated(
                x.astype(dtype), _subpixel_taps(ka, b, 1).astype(dtype), (1, 1), (pads[a], pads[b]),
                dimension_numbers=("NHWC", "HWIO", "NHWC")) for b in range(2)]
            rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (col phase), C]
        y = jnp.stack(rows, axis=2)  # [B, H, 2 (row phase), W, 2 (col phase), C]
        bsz, h, _, w, _, _ = y.shape
        return y.reshape(bsz, 2 * h, 2 * w, c) + bias.astype(dtype)


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> latents [B, H/f, W/f, z_channels]."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        h = _conv(cfg.ch, 3, cfg, name="conv_in")(x.astype(jnp.dtype(cfg.dtype)))
        curr_res = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            for j in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg, cfg.ch * mult, name=f"down_{i}_block_{j}")(h, train)
                if curr_res in cfg.attn_resolutions:
                    h = AttnBlock(cfg, name=f"down_{i}_attn_{j}")(h)
            if i != len(cfg.ch_mult) - 1:
                h = Downsample(cfg, name=f"down_{i}_downsample")(h)
                curr_res //= 2
        h = _mid(cfg, h, train)
        h = swish(_norm(cfg, "norm_out")(h))
        return _conv(cfg.z_channels, 3, cfg, name="conv_out")(h)


class Decoder(nn.Module):
    """Latents [B, h, w, z_channels] -> image [B, h*f, w*f, out_ch] (float32)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        n = len(cfg.ch_mult)
        curr_res = cfg.resolution // 2 ** (n - 1)
        h = _conv(cfg.ch * cfg.ch_mult[-1], 3, cfg, name="conv_in")(z.astype(jnp.dtype(cfg.dtype)))
        h = _mid(cfg, h, train)
        for i in reversed(range(n)):
            for j in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg, cfg.ch * cfg.ch_mult[i], name=f"up_{i}_block_{j}")(h, train)
                if curr_res in cfg.attn_resolutions:
                    h = AttnBlock(cfg, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(cfg, name=f"up_{i}_upsample")(h)
                curr_res *= 2
        h = swish(_norm(cfg, "norm_out")(h))
        # 3 output channels divide no mesh axis: keep the last conv's output axis replicated.
        h = _conv(cfg.out_ch, 3, cfg, out_axis=None, name="conv_out")(h)
        return h.astype(jnp.float32)


def _mid(cfg: VQGANConfig, h: jax.Array, train: bool) -> jax.Array:
    """The middle: ResnetBlock, AttnBlock, ResnetBlock (called inside a compact parent)."""
    c = h.shape[-1]
    h = ResnetBlock(cfg, c, name="mid_block_1")(h, train)
    h = AttnBlock(cfg, name="mid_attn_1")(h)
    return ResnetBlock(cfg, c, name="mid_block_2")(h, train)


class VQGAN(nn.Module):
    """taming's VQModel without the loss: encoder, quant_conv, quantizer, post_quant_conv, decoder.

    Use through `model.apply(variables, x, method=...)`:
      __call__(x, train) -> (xrec, QuantizerOutput)
      encode(x, train) -> QuantizerOutput        decode(z_q, train) -> image
      decode_code(indices [B, h, w] or [B, h*w]) -> image
    With `train=True` and `config.dropout > 0`, pass a `dropout` rng.
    """

    config: VQGANConfig

    def setup(self) -> None:
        cfg = self.config
        if cfg.double_z:
            raise ValueError("VQGAN needs double_z=False (taming's VQModel feeds z_channels to quant_conv)")
        self.encoder = Encoder(cfg)
        self.quant_conv = _conv(cfg.embed_dim, 1, cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy,
                                        cfg.param_dtype)
        self.post_quant_conv = _conv(cfg.z_channels, 1, cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
        """Images NHWC in [-1, 1] -> quantized latents, code indices and quantizer losses."""
        h = self.quant_conv(self.encoder(x, train))
        return self.quantize(h.astype(jnp.float32))

    def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents NHWC -> images NHWC (float32, nominally in [-1, 1])."""
        return self.decoder(self.post_quant_conv(z_q.astype(jnp.dtype(self.config.dtype))), train)

    def decode_code(self, indices: jax.Array) -> jax.Array:
        """Code indices [B, h, w] or [B, h*w] (square grid) -> images."""
        if indices.ndim == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(f"decode_code: {indices.shape[1]} codes per image is not a square grid")
            indices = indices.reshape(indices.shape[0], side, side)
        if indices.ndim != 3:
            raise ValueError(f"decode_code wants indices [B, h, w] or [B, h*w], got {indices.shape}")
        return self.decode(self.quantize.embed_code(indices))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Reconstruction and quantizer output (taming's forward returns (dec, qloss))."""
        q = self.encode(x, train)
        return self.decode(q.z_q, train), q


@functools.lru_cache(maxsize=16)
def abstract_params(config: VQGANConfig) -> Any:
    """Shapes, dtypes and logical axes of the (boxed) params, without allocating them."""
    x = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.in_channels), jnp.float32)
    return jax.eval_shape(VQGAN(config).init, jax.random.PRNGKey(0), x)["params"]


def init_params(config: VQGANConfig, seed: int = 0) -> Any:
    """Fresh boxed params (`nn.Partitioned` leaves carrying logical axes), drawn on the host.

    Same distributions as the modules' initializers (torch's defaults: conv kernels
    U(+-1/sqrt(fan_in)), zero biases, GroupNorm 1/0, codebook U(+-1/n_embed)), but with NumPy:
    `jax.jit(model.init)` spends most of its compile time on ~200 threefry kernels (over a minute
    on a busy 2-core CPU), while this takes milliseconds. Place the result with `jax.device_put`
    and the shardings from `nn.get_partition_spec`.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(jnp.dtype(config.param_dtype))

    def draw(path: tuple[Any, ...], box: nn.Partitioned) -> nn.Partitioned:
        name = path[-1].key
        shape = box.value.shape
        if name == "kernel":
            bound = 1.0 / np.sqrt(np.prod(shape[:-1]))  # fan_in = kh * kw * in
            value = rng.uniform(-bound, bound, shape)
        elif name == "embedding":
            value = rng.uniform(-1.0 / config.n_embed, 1.0 / config.n_embed, shape)
        elif name == "scale":
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        else:
            raise KeyError(f"no initializer for param {jax.tree_util.keystr(path)}")
        return box.replace_boxed(np.asarray(value, dtype))

    return jax.tree_util.tree_map_with_path(
        draw, abstract_params(config), is_leaf=lambda x: isinstance(x, nn.Partitioned))
