"""taming-transformers' PatchGAN discriminator (`NLayerDiscriminator`) and its GAN losses.

Normalisation: BatchNorm, as in taming, with its running statistics as explicit `batch_stats`
state (`BatchNorm` below, torch's semantics exactly: biased variance to normalise, unbiased
variance into the running average, momentum 0.1, eps 1e-5). In training mode the statistics are
over the whole (global) batch of that call: under `jax.jit` with the batch sharded over the mesh,
`jnp.mean` over the batch axis is a global reduction, so every device normalises with the same
statistics (SyncBatchNorm semantics; taming under DDP uses per-GPU statistics, which differ only
by batch composition). Real and fake images go through separate calls, as in taming, so each is
normalised by its own statistics. The running averages are used only with `train=False`
(validation), exactly like taming's eval mode.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_conv_init = nn.initializers.normal(0.02)  # taming's weights_init


def _bn_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over NHWC: params `scale`, `bias`; state `batch_stats` `mean`, `var`."""

    train: bool
    momentum: float = 0.1  # torch convention: new = (1 - momentum) * old + momentum * batch
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", _bn_scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if self.train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if not self.is_initializing():
                n = xf.size // c
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv(4, s2) + LeakyReLU, (n_layers - 1) x [conv(4, s2), BN, LeakyReLU],
    conv(4, s1), BN, LeakyReLU, conv(4, s1) -> 1 logit per patch. Input NHWC in [-1, 1]."""

    ndf: int = 64
    n_layers: int = 3
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        pad = ((1, 1), (1, 1))

        def conv(features: int, stride: int, bias: bool, name: str):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=pad, use_bias=bias,
                           kernel_init=_conv_init, dtype=dtype, name=name)

        def norm(name: str):
            return BatchNorm(train=train, name=name)

        h = x.astype(dtype)
        h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(h), 0.2)
        mult = 1
        for n in range(1, self.n_layers):
            mult = min(2**n, 8)
            h = conv(self.ndf * mult, 2, False, f"conv_{n}")(h)
            h = nn.leaky_relu(norm(f"norm_{n}")(h), 0.2)
        mult = min(2**self.n_layers, 8)
        h = conv(self.ndf * mult, 1, False, f"conv_{self.n_layers}")(h)
        h = nn.leaky_relu(norm(f"norm_{self.n_layers}")(h), 0.2)
        h = conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)
        return h.astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """taming's hinge_d_loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """taming's vanilla_d_loss: 0.5 * (mean softplus(-real) + mean softplus(fake))."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """taming's g_loss: -mean(D(x_rec))."""
    return -jnp.mean(logits_fake)


def adopt_weight(weight: float, step: jax.Array, threshold: int, value: float = 0.0) -> jax.Array:
    """taming's adopt_weight, traceable: `value` before `threshold`, else `weight`."""
    return jnp.where(step < threshold, value, weight)


def init_discriminator(module: NLayerDiscriminator, image_size: int, channels: int = 3,
                       seed: int = 0) -> dict:
    """Fresh {"params", "batch_stats"} drawn on the host with taming's weights_init (conv kernels
    N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0; running mean 0, var 1). NumPy instead of
    `jax.jit(module.init)`: threefry kernels make that compile take tens of seconds on CPU."""
    import numpy as np

    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    shapes = jax.eval_shape(lambda k, x: module.init(k, x, train=False), jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        collection, name = path[0].key, path[-1].key
        parent = path[-2].key if len(path) > 1 else ""
        if collection == "batch_stats":
            value = np.ones(leaf.shape) if name == "var" else np.zeros(leaf.shape)
        elif name == "kernel":
            value = rng.normal(0.0, 0.02, leaf.shape)
        elif name == "scale":
            value = rng.normal(1.0, 0.02, leaf.shape)
        elif name == "bias":
            value = np.zeros(leaf.shape)
        else:
            raise KeyError(f"no initializer for discriminator param {parent}/{name}")
        return np.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
