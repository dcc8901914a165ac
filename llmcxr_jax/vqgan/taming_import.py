"""Import taming-transformers VQModel checkpoints (Lightning `.ckpt` + project yaml) into Flax.

Every Flax parameter is looked up under its taming state_dict key (`taming_key`); conv kernels
go OIHW -> HWIO, GroupNorm weight -> scale, `quantize.embedding.weight` -> codebook. Tensors under
`loss.` (discriminator, LPIPS) are skipped with a one-line summary; anything else left over, a
missing tensor or a shape mismatch is an error naming the tensors.

Loading never runs plain pickle: `torch.load(..., weights_only=True)` first. Lightning checkpoints
often reference classes that torch's allowlist refuses (in Lightning 1.x the `callbacks` dict is
keyed by the callback class itself). Those names are then admitted as inert placeholders: a
placeholder can sit in the unpickled tree (e.g. as a dict key) but any attempt to call or
instantiate it -- which is what a malicious pickle has to do -- raises `UnsafeCheckpointError`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import re
from typing import Any, Mapping

import numpy as np
import yaml
import flax.linen as nn
from flax import traverse_util

from llmcxr_jax.configs import VQGANConfig
from llmcxr_jax.vqgan.model import abstract_params

LOSS_PREFIX = "loss."


class UnsafeCheckpointError(Exception):
    """The checkpoint needs to call or build an object outside the tensor/container allowlist."""


class TamingImportError(ValueError):
    """A checkpoint or yaml that does not fit the taming VQModel layout."""


# --------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------

_LEVEL_ITEM = re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$")
_RESAMPLE = re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$")
_MID = re.compile(r"^mid_(block_1|attn_1|block_2)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "embedding.weight"}


def taming_key(path: tuple[str, ...]) -> str:
    """taming state_dict key of a Flax param path, e.g.
    ('encoder', 'down_1_block_0', 'conv1', 'kernel') -> 'encoder.down.1.block.0.conv1.weight'."""
    parts = []
    for name in path[:-1]:
        if m := _LEVEL_ITEM.match(name):
            parts.append(".".join(m.groups()))
        elif m := _RESAMPLE.match(name):
            parts.append(".".join(m.groups()))
        elif m := _MID.match(name):
            parts.append(f"mid.{m.group(1)}")
        else:
            parts.append(name)
    if path[-1] not in _LEAF:
        raise KeyError(f"no taming name for param leaf {'/'.join(path)}")
    return ".".join(parts + [_LEAF[path[-1]]])


def torch_to_flax(array: np.ndarray) -> np.ndarray:
    """A taming tensor in Flax layout: conv weight OIHW -> HWIO, everything else unchanged."""
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array


def flax_to_torch(array: np.ndarray) -> np.ndarray:
    """Inverse of `torch_to_flax`: conv kernel HWIO -> OIHW."""
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array


def convert_state_dict(state_dict: Mapping[str, Any], config: VQGANConfig,
                       source: str = "checkpoint") -> tuple[dict, str]:
    """Map a taming VQModel state_dict (name -> tensor/array) onto Flax params for `config`.

    Returns (plain nested params of float32 numpy arrays, one-line summary). Raises
    `TamingImportError` naming missing, unexpected or mis-shaped tensors.
    """
    target = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)))
    flat: dict[tuple[str, ...], np.ndarray] = {}
    missing, mismatched, used = [], [], set()
    for path, spec in target.items():
        key = taming_key(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        array = torch_to_flax(_to_numpy(state_dict[key]))
        if tuple(array.shape) != tuple(spec.shape):
            mismatched.append(f"{key}: checkpoint {tuple(flax_to_torch(array).shape)} vs model "
                              f"{tuple(flax_to_torch(np.empty(spec.shape, np.int8)).shape)}")
            continue
        flat[path] = array.astype(np.float32)
    skipped = [k for k in state_dict if k not in used and k.startswith(LOSS_PREFIX)]
    unexpected = sorted(k for k in state_dict if k not in used and not k.startswith(LOSS_PREFIX))
    problems = []
    if mismatched:
        problems.append("shape mismatch (the yaml does not describe this checkpoint?):\n  "
                        + "\n  ".join(mismatched))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {missing}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (not a plain taming VQModel?): "
                        f"{unexpected}")
    if problems:
        raise TamingImportError(f"{source}: " + "\n".join(problems))
    n_skipped = sum(int(np.prod(_to_numpy(state_dict[k]).shape)) for k in skipped)
    summary = (f"imported {len(flat)} tensors ({sum(a.size for a in flat.values()):,} params); "
               f"skipped {len(skipped)} loss.* tensors ({n_skipped:,} params: discriminator/LPIPS)")
    return traverse_util.unflatten_dict(flat), summary


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor
        return t.detach().cpu().float().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
    return np.asarray(t)


# --------------------------------------------------------------------------------------------------
# Config from the taming project yaml
# --------------------------------------------------------------------------------------------------

_DD_FIELDS = ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
              "attn_resolutions", "dropout", "z_channels", "double_z")


def config_from_yaml(path: str | pathlib.Path) -> VQGANConfig:
    """VQGANConfig from a taming project yaml (`model.params.{ddconfig, n_embed, embed_dim}`)."""
    path = pathlib.Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"taming config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise TamingImportError(f"{path}: not valid YAML ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise TamingImportError(f"{path}: not a taming VQModel config (no model.params.ddconfig)")
    target = str(model.get("target", ""))
    if "Gumbel" in target or "EMA" in target:
        raise TamingImportError(f"{path}: model.target {target!r} is not supported "
                                "(only taming's VQModel with VectorQuantizer2)")
    for key in ("n_embed", "embed_dim"):
        if key not in params:
            raise TamingImportError(f"{path}: model.params.{key} is missing")
    if params.get("remap") is not None:
        raise TamingImportError(f"{path}: model.params.remap (index remapping) is not supported")
    dd = params["ddconfig"]
    absent = [k for k in _DD_FIELDS if k not in dd and k not in ("dropout", "double_z")]
    if absent:
        raise TamingImportError(f"{path}: model.params.ddconfig lacks {absent}")
    if dd.get("double_z", False):
        raise TamingImportError(f"{path}: ddconfig.double_z is true; a VQModel needs double_z: False")
    if not dd.get("resamp_with_conv", True):
        raise TamingImportError(f"{path}: ddconfig.resamp_with_conv: False is not supported")
    values = {k: dd[k] for k in _DD_FIELDS if k in dd}
    values["ch_mult"] = tuple(int(m) for m in values["ch_mult"])
    values["attn_resolutions"] = tuple(int(r) for r in values["attn_resolutions"])
    values["dropout"] = float(values.get("dropout", 0.0))
    values["double_z"] = False
    # taming's VQModel hard-codes VectorQuantizer2(beta=0.25) with its default legacy=True.
    return VQGANConfig(**values, n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]),
                       beta=0.25, legacy=True)


# --------------------------------------------------------------------------------------------------
# Safe checkpoint loading
# --------------------------------------------------------------------------------------------------


class _RefusedMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(
            f"checkpoint tries to call {cls._qualified_name}(...); only tensors and plain "
            "containers are admitted")


def _placeholder(qualified_name: str) -> type:
    """An inert stand-in for a refused global: fine as a dict key, raises when called or built."""

    def refuse_new(cls: type, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(
            f"checkpoint tries to build a {qualified_name} object; only tensors and plain "
            "containers are admitted")

    module, _, name = qualified_name.rpartition(".")
    return _RefusedMeta(name or qualified_name, (), {
        "__module__": module, "_qualified_name": qualified_name, "__new__": refuse_new,
        "__repr__": lambda self: f"<refused {qualified_name}>"})


def _unsafe_globals(path: pathlib.Path, error: Exception) -> list[str]:
    """Globals torch's weights_only unpickler refuses in `path` (read without unpickling)."""
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format: take the name from the refusal message
        return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def load_torch_checkpoint(path: str | pathlib.Path) -> Any:
    """Unpickle a torch checkpoint admitting only tensors, storages and plain containers.

    References to other globals become inert placeholders (see the module docstring); calling or
    building one raises `UnsafeCheckpointError`, so no code from the file ever runs.
    """
    import torch

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        error: Exception = first
    except Exception as e:
        raise TamingImportError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    admitted: list[str] = []
    for _ in range(64):  # one round for zip checkpoints; one per refused name for legacy ones
        names = [n for n in _unsafe_globals(path, error) if n not in admitted]
        if not names:
            break
        admitted += names
        try:
            with torch.serialization.safe_globals([(_placeholder(n), n) for n in admitted]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from None
        except pickle.UnpicklingError as e:
            error = e
    if not admitted:  # refused, but not for a global: a damaged or foreign file
        raise TamingImportError(f"{path}: not a readable PyTorch checkpoint ({_reason(error)})")
    raise UnsafeCheckpointError(
        f"{path}: refused to unpickle (only tensors and plain containers are admitted; "
        f"referenced globals: {admitted}): {_reason(error)}")


def _reason(error: Exception) -> str:
    """torch's weights_only refusal without its boilerplate (which suggests weights_only=False)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(keep) or str(error)


def extract_state_dict(checkpoint: Any, path: str | pathlib.Path) -> dict[str, Any]:
    """The model state_dict of a Lightning checkpoint (`checkpoint['state_dict']`) or a bare one."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        return dict(checkpoint["state_dict"])
    if isinstance(checkpoint, dict) and checkpoint and all(hasattr(v, "shape") for v in checkpoint.values()):
        return dict(checkpoint)
    keys = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise TamingImportError(f"{path}: no state_dict found (top level: {keys})")


def import_taming(ckpt: str | pathlib.Path, config_yaml: str | pathlib.Path,
                  out_dir: str | pathlib.Path) -> tuple[VQGANConfig, str]:
    """Read a taming checkpoint and its yaml, write the project's VQ-GAN checkpoint to `out_dir`.

    Returns (config, summary line).
    """
    from llmcxr_jax.vqgan.checkpoint import save_vqgan

    config = config_from_yaml(config_yaml)
    state_dict = extract_state_dict(load_torch_checkpoint(ckpt), ckpt)
    params, summary = convert_state_dict(state_dict, config, source=str(ckpt))
    save_vqgan(out_dir, config, params)
    return config, summary


def taming_ddconfig(config: VQGANConfig) -> dict[str, Any]:
    """taming's `ddconfig` for a VQGANConfig (to build the PyTorch reference)."""
    d = dataclasses.asdict(config)
    dd = {k: d[k] for k in _DD_FIELDS}
    dd["ch_mult"] = list(dd["ch_mult"])
    dd["attn_resolutions"] = list(dd["attn_resolutions"])
    return dd
