"""LPIPS-VGG (Zhang et al. 2018, as taming-transformers uses it) in JAX, from local weight files.

Nothing is downloaded. Two files:
- VGG16 convolution weights: torchvision's `vgg16` state dict (`features.{i}.weight/bias`), as a
  `.pth` (read with `torch.load(..., weights_only=True)`, so torch must be installed), or the same
  keys in a `.safetensors` / `.npz` file.
- The five linear heads (`lin{k}.model.1.weight`, shape [1, C, 1, 1]): by default the
  `weights/v0.1/vgg.pth` that the `lpips` wheel ships (located without importing the package).

`lpips_distance(params, x, y)` is taming's `LPIPS.forward` in eval mode (no dropout on the heads):
scaling layer, VGG16 relu1_2 .. relu5_3, channel-normalised features, squared differences, 1x1
heads, spatial mean, summed over the five layers. Inputs are NHWC in [-1, 1]; output [B].
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg16.features: index of each conv; the relu after the last conv of block k is the
# k-th LPIPS tap; a 2x2 max-pool starts each block after the first.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def load_tensor_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A flat {name: array} from `.pth`/`.pt` (torch, weights_only), `.safetensors` or `.npz`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path}: reading a .pth needs torch; convert it to .safetensors or "
                              ".npz (same keys) to use it without torch") from None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        return dict(load_file(str(path)))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    raise ValueError(f"{path}: unsupported weights format {suffix!r} (.pth, .safetensors, .npz)")


def packaged_lpips_heads_path() -> pathlib.Path | None:
    """`lpips/weights/v0.1/vgg.pth` from the installed `lpips` wheel, or None."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def vgg16_params_from_state(state: Mapping[str, np.ndarray], source: str = "<state>") -> dict:
    """torchvision vgg16 `features.*` tensors -> {"conv{i}": {"kernel" HWIO, "bias"}}."""
    params = {}
    for block in VGG16_BLOCKS:
        for i in block:
            wkey, bkey = f"features.{i}.weight", f"features.{i}.bias"
            if wkey not in state or bkey not in state:
                raise KeyError(f"{source}: no {wkey}/{bkey}; expected torchvision's vgg16 state dict")
            w = np.asarray(state[wkey], np.float32)
            params[f"conv{i}"] = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)),
                                  "bias": jnp.asarray(np.asarray(state[bkey], np.float32))}
    return params


def lpips_heads_from_state(state: Mapping[str, np.ndarray], source: str = "<state>") -> list:
    """The five LPIPS heads as channel weight vectors [C]."""
    heads = []
    for k, c in enumerate(LPIPS_CHANNELS):
        key = f"lin{k}.model.1.weight"
        if key not in state:
            raise KeyError(f"{source}: no {key}; expected the lpips package's vgg.pth heads")
        w = np.asarray(state[key], np.float32).reshape(-1)
        if w.shape != (c,):
            raise ValueError(f"{source}: {key} has {w.shape[0]} channels, expected {c}")
        heads.append(jnp.asarray(w))
    return heads


def load_lpips_params(vgg_path: str | pathlib.Path,
                      heads_path: str | pathlib.Path | None = None) -> dict[str, Any]:
    """{"vgg": ..., "heads": [...]} from the two local files (heads default: the lpips wheel's)."""
    if heads_path is None or str(heads_path) == "":
        heads_path = packaged_lpips_heads_path()
        if heads_path is None:
            raise FileNotFoundError("no LPIPS head weights: install the `lpips` package or give "
                                    "lpips_heads_path (its weights/v0.1/vgg.pth)")
    return {"vgg": vgg16_params_from_state(load_tensor_file(vgg_path), str(vgg_path)),
            "heads": lpips_heads_from_state(load_tensor_file(heads_path), str(heads_path))}


def _conv3x3(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, p["kernel"].astype(x.dtype), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].astype(x.dtype)


def _maxpool2(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def vgg16_taps(vgg: Mapping[str, Any], x: jax.Array) -> list[jax.Array]:
    """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16 for NHWC input (already scaled)."""
    taps = []
    h = x
    for b, block in enumerate(VGG16_BLOCKS):
        if b > 0:
            h = _maxpool2(h)
        for i in block:
            h = jax.nn.relu(_conv3x3(h, vgg[f"conv{i}"]))
        taps.append(h)
    return taps


def _normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def lpips_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS-VGG distance per image [B] between NHWC images in [-1, 1]."""
    shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
    both = (jnp.concatenate([x, y], 0).astype(jnp.float32) - shift) / scale
    taps = vgg16_taps(params["vgg"], both)
    n = x.shape[0]
    total = jnp.zeros((n,), jnp.float32)
    for f, head in zip(taps, params["heads"]):
        d = (_normalize(f[:n]) - _normalize(f[n:])) ** 2
        total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, head), axis=(1, 2))
    return total
