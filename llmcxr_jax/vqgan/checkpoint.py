"""The project's VQ-GAN checkpoint: a directory with `config.json` and `params.safetensors`.

    DIR/config.json          configs.to_dict(VQGANConfig)
    DIR/params.safetensors   every param under its Flax path joined by '/', e.g.
                             'decoder/conv_out/kernel' (HWIO), stored as float32

Why safetensors rather than orbax: a VQ-GAN is small (~70 M params for the paper's f16 model) and
is used whole on every host, so one flat, memory-mappable file is enough; it needs no restore
arguments or target tree, other tools (PyTorch, the `safetensors` CLI) read it, and it holds no
code. Training state (optimizer, step, data iterator) lives in the trainer's orbax checkpoints;
this format is the exported model. bfloat16 params are widened to float32 on disk (lossless;
safetensors' numpy reader has no bfloat16) and cast back to `config.param_dtype` on load.

Writes are atomic per file (`io_utils.atomic_write`: temp name + fsync + `os.replace`), params
first and config last, and `load_vqgan` checks every tensor's name and shape against the config,
so an interrupted write never loads as a silently wrong model.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import flax.linen as nn
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from llmcxr_jax import configs
from llmcxr_jax.configs import VQGANConfig
from llmcxr_jax.io_utils import atomic_write, atomic_write_text
from llmcxr_jax.vqgan.model import abstract_params

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
SEP = "/"


def save_vqgan(directory: str | pathlib.Path, config: VQGANConfig, params: Any) -> pathlib.Path:
    """Write `config` and `params` (boxed or plain, host or device arrays) to `directory`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    tensors = {SEP.join(k): np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32))
               for k, v in flat.items()}
    atomic_write(directory / PARAMS_FILE,
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "llmcxr_jax.vqgan"}))
    text = json.dumps(configs.to_dict(config), indent=2) + "\n"
    atomic_write_text(directory / CONFIG_FILE, text)
    return directory


def load_config(directory: str | pathlib.Path) -> VQGANConfig:
    """The VQGANConfig of a checkpoint directory."""
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"VQ-GAN checkpoint: {path} does not exist "
                                f"(expected {CONFIG_FILE} and {PARAMS_FILE} in {directory})")
    try:
        return configs.from_dict(VQGANConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"VQ-GAN checkpoint: {path} is not a valid VQGANConfig ({e})") from None


def load_vqgan(directory: str | pathlib.Path) -> tuple[VQGANConfig, dict]:
    """(config, plain nested params of numpy arrays in `config.param_dtype`) from `directory`.

    Raises FileNotFoundError / ValueError naming the file when it is missing, corrupt, or does
    not match the config (missing, unexpected or mis-shaped tensors).
    """
    directory = pathlib.Path(directory)
    config = load_config(directory)
    path = directory / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"VQ-GAN checkpoint: {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"VQ-GAN checkpoint: {path} is corrupt or not safetensors ({e})") from None
    expected = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)))
    names = {SEP.join(k): k for k in expected}
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    wrong = [f"{n}: file {tensors[n].shape} vs config {expected[names[n]].shape}"
             for n in sorted(set(names) & set(tensors)) if tensors[n].shape != expected[names[n]].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"VQ-GAN checkpoint: {path} does not match {directory / CONFIG_FILE}: "
                         f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                         f"unexpected {unexpected[:10]}, shape mismatch {wrong[:10]}")
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    flat = {names[n]: t.astype(dtype) for n, t in tensors.items()}
    return config, traverse_util.unflatten_dict(flat)
