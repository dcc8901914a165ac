"""A small chest X-ray CNN: multi-label findings classifier and feature extractor.

It is the judge of the paper's report -> image protocol (AUROC / F1 of generated images against
the labels of the reports that produced them), the feature space of our FID, and the feature
network of the VQ-GAN's clinical information-preserving loss.

Input: NHWC images in [-1, 1], any height and width (global pooling) and any channel count (the
channels are averaged: radiographs are grayscale; our images replicate gray into RGB). A patchify
stem (a `patch` x `patch` conv with that stride, lossless-capable since it has more outputs than
inputs) to `widths[0]`, then one stage per entry of `widths`: a 2x2 stride-2 conv between stages
and `blocks` residual blocks (conv - GroupNorm - swish, twice) in each. The patchify stem and
2x2 downsampling keep it at about 0.1 GFLOP per 128 px image: it has to train in minutes on a
shared CPU, where XLA convolutions run at a few GFLOP/s. GroupNorm keeps the network free of batch statistics, so it is
a pure function of (params, images) under jit, sharding and inside other losses. Features are the
concatenated global average and global max of the last stage ([B, 2 * widths[-1]]); max pooling
keeps small findings (a nodule, a thin pneumothorax line) from being averaged away. Logits are
a linear layer on the features.

Checkpoint directory (the format a user's own classifier must have):

    DIR/config.json          ClassifierConfig as JSON
    DIR/params.safetensors   params under their Flax path joined by '/', float32
    DIR/thresholds.json      optional {label: decision threshold} (tuned on a validation split)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from llmcxr_jax import configs
from llmcxr_jax.data.findings import CHEXPERT_LABELS, PHANTOM_DRAWN_LABELS
from llmcxr_jax.io_utils import atomic_write as _atomic_write

Array = jax.Array
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
THRESHOLDS_FILE = "thresholds.json"  # optional
FORMAT = "llmcxr_jax.classifier"
SEP = "/"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and the labels it predicts (their order is the logits' order)."""

    labels: tuple[str, ...] = PHANTOM_DRAWN_LABELS
    patch: int = 4  # stem: patch x patch conv with stride patch
    widths: tuple[int, ...] = (24, 48, 96, 192)
    blocks: int = 1  # residual blocks per stage
    groups: int = 8  # GroupNorm groups (each width must be divisible)
    image_size: int = 128  # the size it was trained at (inputs of other sizes still run)
    dtype: str = "float32"  # compute dtype; params are float32

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("ClassifierConfig.labels is empty")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"ClassifierConfig.labels has duplicates: {self.labels}")
        unknown = [n for n in self.labels if n not in CHEXPERT_LABELS]
        if unknown:
            raise ValueError(f"ClassifierConfig.labels {unknown} are not CheXpert labels "
                             f"{CHEXPERT_LABELS}")
        if self.patch < 1:
            raise ValueError(f"ClassifierConfig.patch must be >= 1, got {self.patch}")
        for w in self.widths:
            if w % self.groups:
                raise ValueError(f"width {w} is not divisible by groups={self.groups}")
        if not self.widths or self.blocks < 0:
            raise ValueError("ClassifierConfig needs at least one stage and blocks >= 0")

    @property
    def feature_dim(self) -> int:
        return 2 * self.widths[-1]


class ResBlock(nn.Module):
    width: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = x
        for i in range(2):
            h = nn.Conv(self.width, (3, 3), dtype=self.dtype, name=f"conv{i}")(h)
            h = nn.GroupNorm(self.groups, dtype=self.dtype, name=f"norm{i}")(h)
            if i == 0:
                h = nn.swish(h)
        return nn.swish(x + h)


class CXRClassifier(nn.Module):
    """`__call__(images) -> (logits [B, L], features [B, F])`."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, images: Array) -> tuple[Array, Array]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if images.ndim != 4:
            raise ValueError(f"classifier input must be NHWC, got shape {images.shape}")
        x = jnp.mean(images.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
        p = cfg.patch
        x = nn.Conv(cfg.widths[0], (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                    name="stem")(x)
        x = nn.swish(nn.GroupNorm(cfg.groups, dtype=dtype, name="stem_norm")(x))
        for s, width in enumerate(cfg.widths):
            if s > 0:
                x = nn.Conv(width, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                            name=f"down{s}")(x)
                x = nn.swish(nn.GroupNorm(cfg.groups, dtype=dtype, name=f"down{s}_norm")(x))
            for b in range(cfg.blocks):
                x = ResBlock(width, cfg.groups, dtype, name=f"stage{s}_block{b}")(x)
        x = x.astype(jnp.float32)
        features = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], axis=-1)
        logits = nn.Dense(len(cfg.labels), name="head")(features)
        return logits, features


def param_shapes(config: ClassifierConfig) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s (traced, nothing computed)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: CXRClassifier(config).init(jax.random.key(0), x)["params"], x)


def init_params(config: ClassifierConfig, seed: int = 0) -> dict:
    """Fresh float32 params drawn on the host with NumPy: kernels LeCun-normal (variance
    1 / fan_in), biases 0, GroupNorm scales 1. Host init keeps start-up free of XLA compilations
    of random-number kernels, which cost seconds per layer on a small CPU."""
    rng = np.random.default_rng(seed)

    def init(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(init, param_shapes(config))


def logits_fn(config: ClassifierConfig) -> Callable[[Any, Array], Array]:
    """(params, images) -> logits [B, L]."""
    model = CXRClassifier(config)
    return lambda params, images: model.apply({"params": params}, images)[0]


def feature_fn(config: ClassifierConfig) -> Callable[[Any, Array], Array]:
    """(params, images) -> features [B, F] (F = config.feature_dim): for FID and the clinical loss."""
    model = CXRClassifier(config)
    return lambda params, images: model.apply({"params": params}, images)[1]


def features(params: Any, images: Array, config: ClassifierConfig | None = None) -> Array:
    """Features [B, F] of `images`; the config defaults to `ClassifierConfig()` but must match
    `params` (pass the loaded one)."""
    return feature_fn(config or ClassifierConfig())(params, images)


@functools.lru_cache(maxsize=None)
def jitted_features(config: ClassifierConfig) -> Callable[[Any, Array], Array]:
    """`feature_fn(config)` under jit, one compiled function per config (and input shape)."""
    return jax.jit(feature_fn(config))


@functools.lru_cache(maxsize=None)
def jitted_probabilities(config: ClassifierConfig) -> Callable[[Any, Array], Array]:
    """(params, images) -> sigmoid probabilities [B, L], jitted once per config."""
    fn = logits_fn(config)
    return jax.jit(lambda params, images: jax.nn.sigmoid(fn(params, images)))


def batched(jitted: Callable[[Any, Array], Array], params: Any, images: np.ndarray,
            batch_size: int = 64) -> np.ndarray:
    """Apply a jitted `(params, images) -> [B, ...]` over host images in fixed-size batches (the
    last one zero-padded, so one compilation serves every batch)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    outs = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:],
                                                    chunk.dtype)])
        outs.append(np.asarray(jitted(params, jnp.asarray(chunk, jnp.float32)))[:n])
    if not outs:
        raise ValueError("no images")
    return np.concatenate(outs)


def predict_proba(config: ClassifierConfig, params: Any, images: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities [N, L] (label order `config.labels`)."""
    return batched(jitted_probabilities(config), params, images, batch_size)


def extract_features(config: ClassifierConfig, params: Any, images: np.ndarray,
                     batch_size: int = 64) -> np.ndarray:
    """Features [N, F] of host images, batched and jitted."""
    return batched(jitted_features(config), params, images, batch_size)


# --------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------


def save_classifier(directory: str | pathlib.Path, config: ClassifierConfig, params: Any
                    ) -> pathlib.Path:
    """Write params then config (each atomically), so a half-written checkpoint never loads."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    tensors = {SEP.join(k): np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32))
               for k, v in flat.items()}
    _atomic_write(directory / PARAMS_FILE,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    text = json.dumps(configs.to_dict(config), indent=2) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda tmp: pathlib.Path(tmp).write_text(text))
    return directory


def load_config(directory: str | pathlib.Path) -> ClassifierConfig:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint: {path} does not exist (expected "
                                f"{CONFIG_FILE} and {PARAMS_FILE} in {directory})")
    try:
        return configs.from_dict(ClassifierConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"classifier checkpoint: {path} is not a valid ClassifierConfig ({e})"
                         ) from None


def load_classifier(directory: str | pathlib.Path) -> tuple[ClassifierConfig, dict]:
    """(config, params of float32 numpy arrays); every tensor's name and shape is checked."""
    directory = pathlib.Path(directory)
    config = load_config(directory)
    path = directory / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint: {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"classifier checkpoint: {path} is corrupt or not safetensors ({e})"
                         ) from None
    flat_shapes = traverse_util.flatten_dict(param_shapes(config))
    expected = {SEP.join(k): v.shape for k, v in flat_shapes.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{n}: file {tensors[n].shape} vs config {expected[n]}"
             for n in sorted(set(expected) & set(tensors)) if tuple(tensors[n].shape) != expected[n]]
    if missing or unexpected or wrong:
        raise ValueError(f"classifier checkpoint: {path} does not match {directory / CONFIG_FILE}:"
                         f" missing {missing[:10]}, unexpected {unexpected[:10]}, "
                         f"shape mismatch {wrong[:10]}")
    flat = {tuple(n.split(SEP)): t.astype(np.float32) for n, t in tensors.items()}
    return config, traverse_util.unflatten_dict(flat)


def save_thresholds(directory: str | pathlib.Path, config: ClassifierConfig,
                    thresholds: Any) -> None:
    """Per-label decision thresholds (e.g. F1-optimal on a validation split) as
    DIR/thresholds.json {label: threshold}."""
    values = [float(v) for v in np.asarray(thresholds, np.float64).ravel()]
    if len(values) != len(config.labels):
        raise ValueError(f"{len(values)} thresholds for {len(config.labels)} labels")
    text = json.dumps(dict(zip(config.labels, values)), indent=2) + "\n"
    _atomic_write(pathlib.Path(directory) / THRESHOLDS_FILE,
                  lambda tmp: pathlib.Path(tmp).write_text(text))


def load_thresholds(directory: str | pathlib.Path, config: ClassifierConfig) -> np.ndarray | None:
    """The saved per-label thresholds in `config.labels` order, or None if there are none."""
    path = pathlib.Path(directory) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return np.array([float(data[name]) for name in config.labels])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"classifier thresholds: {path} must map every label of "
                         f"{directory / CONFIG_FILE} to a number ({type(e).__name__}: {e})") from None


def load_feature_net(directory: str | pathlib.Path
                     ) -> tuple[Callable[[Any, Array], Array], dict, ClassifierConfig]:
    """(features(params, images) -> [B, F], params, config) from a checkpoint directory: what the
    VQ-GAN's clinical loss (`vqgan.losses.FeatureNet`) and FID need."""
    config, params = load_classifier(directory)
    return feature_fn(config), params, config
