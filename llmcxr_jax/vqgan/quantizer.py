"""Vector quantizer: taming-transformers' `VectorQuantizer2` in Flax.

Nearest codebook entry by L2 distance, straight-through gradient, and the codebook + commitment
losses. `legacy=True` keeps taming's default (and historically buggy) placement of `beta`:

    legacy:     loss = mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)
    non-legacy: loss = beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2)

so checkpoints imported from taming train on exactly as they were trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct


@struct.dataclass
class QuantizerOutput:
    """What the quantizer returns (a pytree, so it passes through `jax.jit`).

    z_q: quantized latents with the straight-through gradient, NHWC float32.
    z: the encoder's latents before quantization (after `quant_conv`), NHWC float32.
    indices: nearest code per latent position, int32 [B, h, w].
    codebook_loss: mean((z_q - sg(z))^2), moves the codes towards the encoder outputs.
    commitment_loss: mean((sg(z_q) - z)^2), moves the encoder outputs towards their codes.
    loss: the two combined with `beta` as taming combines them (see the module docstring).
    perplexity: exp(entropy) of the code histogram of this batch (n_embed when uniform).
    code_counts: how many latents picked each code in this batch, int32 [n_embed].
    """

    z_q: jax.Array
    z: jax.Array
    indices: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array
    loss: jax.Array
    perplexity: jax.Array
    code_counts: jax.Array


def codebook_init(n_embed: int):
    """taming's codebook init: uniform in [-1/n_embed, 1/n_embed)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -1.0 / n_embed, 1.0 / n_embed)

    return init


def nearest_codes(z_flat: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code (L2) for each row of `z_flat` [N, D]; codebook [K, D].

    Uses taming's expansion |z|^2 + |e|^2 - 2 z.e at full fp32 precision (TPU/GPU matmuls
    default to bf16 passes, which would change the argmin).
    """
    z_flat = z_flat.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dots = jnp.einsum("nd,kd->nk", z_flat, codebook, precision=jax.lax.Precision.HIGHEST)
    d = (jnp.sum(z_flat**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)[None, :]
         - 2.0 * dots)
    return jnp.argmin(d, axis=1).astype(jnp.int32)


def perplexity_from_counts(counts: jax.Array) -> jax.Array:
    """exp(entropy) of a code histogram, as taming's VectorQuantizer reports it."""
    p = counts.astype(jnp.float32) / jnp.maximum(jnp.sum(counts), 1)
    return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))


class VectorQuantizer(nn.Module):
    """Codebook of `n_embed` vectors of size `embed_dim`; param `embedding` [n_embed, embed_dim]."""

    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    param_dtype: str = "float32"

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(codebook_init(self.n_embed), ("codebook", "embed")),
            (self.n_embed, self.embed_dim), jnp.dtype(self.param_dtype))

    def __call__(self, z: jax.Array) -> QuantizerOutput:
        """Quantize NHWC latents `z` (last axis `embed_dim`)."""
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"latents have {z.shape[-1]} channels, codebook has {self.embed_dim}")
        z = z.astype(jnp.float32)
        codebook = self.embedding.astype(jnp.float32)
        indices = nearest_codes(z.reshape(-1, self.embed_dim), codebook)
        z_q = jnp.take(codebook, indices, axis=0).reshape(z.shape)

        sg = jax.lax.stop_gradient
        codebook_loss = jnp.mean((z_q - sg(z)) ** 2)
        commitment_loss = jnp.mean((sg(z_q) - z) ** 2)
        if self.legacy:
            loss = commitment_loss + self.beta * codebook_loss
        else:
            loss = self.beta * commitment_loss + codebook_loss

        counts = jnp.bincount(indices, length=self.n_embed).astype(jnp.int32)
        return QuantizerOutput(
            z_q=z + sg(z_q - z),  # straight-through: forward z_q, backward identity
            z=z,
            indices=indices.reshape(z.shape[:-1]),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            loss=loss,
            perplexity=perplexity_from_counts(counts),
            code_counts=counts,
        )

    def embed_code(self, indices: jax.Array) -> jax.Array:
        """Codebook vectors for integer `indices` of any shape -> indices.shape + (embed_dim,)."""
        return jnp.take(self.embedding.astype(jnp.float32), indices.astype(jnp.int32), axis=0)
