"""Tensor-by-tensor mapping between transformers' GPT-NeoX state dict and our Flax params.

Only pure NumPy reshapes live here; reading and writing files, streaming into shardings and
resizing the vocabulary are in `hf_io.py`. Per-layer HF tensors map to one slice of a stacked
(scanned) Flax parameter: `hf_to_flax_key` returns the Flax path and the layer index (or None).
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from llmcxr_jax.configs import ModelConfig

FlaxPath = tuple[str, ...]

_LAYER_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")

# HF per-layer suffix -> Flax path under params["layers"].
_LAYER_KEYS: dict[str, FlaxPath] = {
    "input_layernorm.weight": ("input_layernorm", "scale"),
    "input_layernorm.bias": ("input_layernorm", "bias"),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "scale"),
    "post_attention_layernorm.bias": ("post_attention_layernorm", "bias"),
    "attention.query_key_value.weight": ("attention", "query_key_value", "kernel"),
    "attention.query_key_value.bias": ("attention", "query_key_value", "bias"),
    "attention.dense.weight": ("attention", "dense", "kernel"),
    "attention.dense.bias": ("attention", "dense", "bias"),
    "mlp.dense_h_to_4h.weight": ("mlp", "dense_h_to_4h", "kernel"),
    "mlp.dense_h_to_4h.bias": ("mlp", "dense_h_to_4h", "bias"),
    "mlp.dense_4h_to_h.weight": ("mlp", "dense_4h_to_h", "kernel"),
    "mlp.dense_4h_to_h.bias": ("mlp", "dense_4h_to_h", "bias"),
}
_GLOBAL_KEYS: dict[str, FlaxPath] = {
    "gpt_neox.embed_in.weight": ("embed_in", "embedding"),
    "gpt_neox.final_layer_norm.weight": ("final_layer_norm", "scale"),
    "gpt_neox.final_layer_norm.bias": ("final_layer_norm", "bias"),
    "lm_head.weight": ("embed_out", "kernel"),  # transformers >= 5 name
    "embed_out.weight": ("embed_out", "kernel"),  # original Pythia / dolly-v2 checkpoints
}
# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_HF_KEY_RE = re.compile(
    r"(\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$)|(rotary_emb\.inv_freq$)")


def hf_to_flax_key(key: str) -> tuple[FlaxPath, int | None] | None:
    """(Flax path, layer index or None) for an HF tensor name; None for ignored buffers.

    Raises KeyError for a name that is neither a known weight nor an ignorable buffer.
    """
    if IGNORED_HF_KEY_RE.search(key):
        return None
    if key in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[key], None
    m = _LAYER_RE.match(key)
    if m and m.group(2) in _LAYER_KEYS:
        return ("layers",) + _LAYER_KEYS[m.group(2)], int(m.group(1))
    raise KeyError(f"unexpected GPT-NeoX tensor {key!r}")


def flax_to_hf_keys(config: ModelConfig) -> list[tuple[str, FlaxPath, int | None]]:
    """Every HF tensor name with its Flax path and layer index, in HF's order."""
    out: list[tuple[str, FlaxPath, int | None]] = [
        ("gpt_neox.embed_in.weight", _GLOBAL_KEYS["gpt_neox.embed_in.weight"], None)]
    for i in range(config.num_layers):
        for suffix, path in _LAYER_KEYS.items():
            if not config.attention_bias and suffix.startswith("attention.") and suffix.endswith(
                    ".bias"):
                continue
            out.append((f"gpt_neox.layers.{i}.{suffix}", ("layers",) + path, i))
    for key in ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
                "lm_head.weight"):
        out.append((key, _GLOBAL_KEYS[key], None))
    return out


def hf_to_flax_tensor(path: FlaxPath, tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Reshape one HF tensor (torch layout) to the Flax layout of `path` (one layer's slice)."""
    h, d, e = config.num_heads, config.head_dim, config.hidden_size
    leaf = path[-2:]
    if leaf == ("query_key_value", "kernel"):  # [3*h*d, e] -> [e, h, 3, d]
        return tensor.reshape(h, 3, d, e).transpose(3, 0, 1, 2)
    if leaf == ("query_key_value", "bias"):
        return tensor.reshape(h, 3, d)
    if leaf == ("dense", "kernel") and path[-3] == "attention":  # [e, h*d] -> [h, d, e]
        return tensor.reshape(e, h, d).transpose(1, 2, 0)
    if path[-1] == "kernel":  # nn.Linear [out, in] -> Dense [in, out]
        return tensor.T
    return tensor


def flax_to_hf_tensor(path: FlaxPath, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Inverse of `hf_to_flax_tensor` for one layer's slice."""
    h, d, e = config.num_heads, config.head_dim, config.hidden_size
    leaf = path[-2:]
    if leaf == ("query_key_value", "kernel"):  # [e, h, 3, d] -> [3*h*d, e]
        return array.transpose(1, 2, 3, 0).reshape(3 * h * d, e)
    if leaf == ("query_key_value", "bias"):
        return array.reshape(3 * h * d)
    if leaf == ("dense", "kernel") and path[-3] == "attention":  # [h, d, e] -> [e, h*d]
        return array.transpose(2, 0, 1).reshape(e, h * d)
    if path[-1] == "kernel":
        return array.T
    return array


def params_from_state_dict(state: dict[str, np.ndarray], config: ModelConfig,
                           to_array: Callable[[np.ndarray], np.ndarray] = np.asarray) -> dict:
    """A full nested Flax params dict from an in-memory HF state dict (small models, tests)."""
    params: dict = {}
    stacked: dict[FlaxPath, list] = {}
    for key, tensor in state.items():
        mapped = hf_to_flax_key(key)
        if mapped is None:
            continue
        path, layer = mapped
        value = hf_to_flax_tensor(path, np.asarray(tensor), config)
        if layer is None:
            _set(params, path, to_array(value))
        else:
            stacked.setdefault(path, [None] * config.num_layers)[layer] = value
    for path, slices in stacked.items():
        missing = [i for i, s in enumerate(slices) if s is None]
        if missing:
            raise KeyError(f"{'/'.join(path)}: layers {missing} missing from the state dict")
        _set(params, path, to_array(np.stack(slices)))
    return params


def state_dict_from_params(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF state dict (NumPy) from Flax params, in HF's tensor order."""
    out = {}
    for key, path, layer in flax_to_hf_keys(config):
        value = np.asarray(_get(params, path))
        if layer is not None:
            value = value[layer]
        out[key] = np.ascontiguousarray(flax_to_hf_tensor(path, value, config))
    return out


def _set(tree: dict, path: FlaxPath, value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: dict, path: FlaxPath) -> np.ndarray:
    for name in path:
        tree = tree[name]
    return tree
