"""VQ-GAN generator losses: L1, perceptual (pluggable network), clinical feature L2, and taming's
adaptive GAN weight.

Frozen networks (LPIPS-VGG, a CXR classifier) are a pure function plus a params pytree. The params
are passed to the jitted step as arguments (never closed over, which would bake tens of MB of
constants into the compiled program).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llmcxr_jax.vqgan import lpips

# (params, x, y) -> per-image distance [B]; images NHWC in [-1, 1].
DistanceFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (params, images NHWC in [-1, 1]) -> features [B, D].
FeatureFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PerceptualNet:
    """A frozen perceptual distance: `distance(params, x, y) -> [B]`."""

    name: str
    distance: DistanceFn
    params: Any


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """A frozen feature extractor for the clinical loss: `features(params, images) -> [B, D]`
    (in the phantom world the phantom classifier's penultimate features)."""

    name: str
    features: FeatureFn
    params: Any


def l1_loss(x: jax.Array, xrec: jax.Array) -> jax.Array:
    """mean |x - xrec| (taming's rec_loss before the perceptual term)."""
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - xrec.astype(jnp.float32)))


def perceptual_loss(net: PerceptualNet, params: Any, x: jax.Array, xrec: jax.Array) -> jax.Array:
    """Batch mean of the network's distance (taming: mean of LPIPS [B,1,1,1])."""
    return jnp.mean(net.distance(params, x, xrec))


def clinical_feature_loss(net: FeatureNet, params: Any, x: jax.Array, xrec: jax.Array) -> jax.Array:
    """The paper's clinical-information-preserving loss: mean squared difference between the
    feature vectors of input and reconstruction (the input side is a fixed target)."""
    target = jax.lax.stop_gradient(net.features(params, x)).astype(jnp.float32)
    return jnp.mean((net.features(params, xrec).astype(jnp.float32) - target) ** 2)


def tap_distance(taps: Callable[[Any, jax.Array], list[jax.Array]]) -> DistanceFn:
    """A perceptual distance from any multi-layer feature network without learned heads: LPIPS's
    recipe (channel-normalised features, squared difference, channel sum, spatial mean, summed
    over layers) with unit weights."""

    def distance(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        n = x.shape[0]
        total = jnp.zeros((n,), jnp.float32)
        for f in taps(params, jnp.concatenate([x, y], 0)):
            f = f.astype(jnp.float32)
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
            total = total + jnp.mean(jnp.sum((f[:n] - f[n:]) ** 2, axis=-1), axis=(1, 2))
        return total

    return distance


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float,
                    max_weight: float = 1e4) -> jax.Array:
    """taming's calculate_adaptive_weight from the two gradients w.r.t. the decoder's last layer:
    disc_weight * clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4), with no gradient through it."""
    w = jnp.linalg.norm(nll_grad.reshape(-1)) / (jnp.linalg.norm(g_grad.reshape(-1)) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight)) * disc_weight


def lpips_net(vgg_path: str | pathlib.Path | None,
              heads_path: str | pathlib.Path | None = None,
              log: Callable[[str], None] = print) -> PerceptualNet | None:
    """LPIPS-VGG from local files, or None (with one message saying the perceptual weight is 0)
    when no VGG16 weights are given."""
    if not vgg_path:
        log("perceptual loss: no VGG16 weights given (lpips_vgg_path; torchvision's vgg16 state "
            "dict as .pth/.safetensors/.npz, nothing can be downloaded) -> LPIPS off, weight 0")
        return None
    params = lpips.load_lpips_params(vgg_path, heads_path or None)
    return PerceptualNet("lpips-vgg16", lpips.lpips_distance, params)
