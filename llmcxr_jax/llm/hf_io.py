"""Reading and writing transformers GPT-NeoX checkpoints, one tensor at a time.

Import (`import_hf`): `config.json` -> `ModelConfig`; weights from `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, or `pytorch_model*.bin` (read with
`torch.load(..., weights_only=True)` only); the tokenizer of the same directory with the Dolly
specials and the image ids (`llmcxr_jax.text.vocab`). Every tensor is read on its own, mapped with
`hf_mapping`, and placed straight into its target sharding with `jax.make_array_from_callback`, so
each device only receives its shard and the host holds at most one parameter at a time.

Vocabulary growth. The checkpoint's first `min(rows, n_text)` embedding rows are kept (text ids; the
Dolly specials may sit in a checkpoint's padding rows, as in dolly-v2 trained from Pythia). Every
other row (the image ids, and the padding rows up to the multiple of 128) is new, initialised as
transformers' `resize_token_embeddings` does by default (`mean_resizing=True`): sampled from
N(mean, 1e-9 * covariance) of the kept rows, or the plain mean when that covariance is not positive
definite (`resize="mean_cov"`, the default); `resize="mean"` puts the mean in every new row. The
input embedding and the output matrix are grown alike, each from its own rows. One deviation: rows
a checkpoint has past its tokenizer (Pythia's 27 padding rows) are treated as untrained padding and
re-initialised rather than inherited by the first image ids. A directory written by `export_hf`
carries `llmcxr_vocab.json`; when that matches, all its rows are kept, so export -> import is exact.

Export (`export_hf`): a `config.json` for `GPTNeoXForCausalLM` (vocab_size = embedding rows),
safetensors shards with `model.safetensors.index.json` under the tensor names transformers itself
writes, and the tokenizer files; written into `DIR.tmp` and renamed when complete. The output
matrix is stored as `embed_out.weight`: transformers 5.x names the module `lm_head` but its
`save_pretrained` writes `embed_out.weight` (a renaming rule maps it back on load, silently), and
4.x only knows `embed_out`, so that name loads in both. Each tensor is gathered to the host on its
own; process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from jax.sharding import Mesh
from tqdm.auto import tqdm

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm import hf_mapping
from llmcxr_jax.llm.hf_mapping import FlaxPath
from llmcxr_jax.llm.model import Params
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.text import vocab as vocab_lib
from llmcxr_jax.text.vocab import Vocab

ARCHITECTURE = "GPTNeoXForCausalLM"
MODEL_TYPE = "gpt_neox"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
RESIZE_METHODS = ("mean_cov", "mean")
COVARIANCE_SCALE = 1e-9  # transformers' `_init_added_embeddings_weights_with_mean` epsilon
_VOCAB_PATHS = (("embed_in", "embedding"), ("embed_out", "kernel"))
# Export names that differ from hf_mapping's (transformers 5.x module) names; see the docstring.
EXPORT_RENAMES = {"lm_head.weight": "embed_out.weight"}
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory that cannot be read as GPT-NeoX."""


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """`ModelConfig` (vocab_size = the checkpoint's embedding rows) from an HF GPT-NeoX config dict.

    Accepts both transformers 5.x (`rope_parameters`) and older (`rotary_pct`, `rotary_emb_base`)
    layouts; raises `HFCheckpointError` naming `source` for anything this model cannot represent.
    """
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
        raise HFCheckpointError(
            f"{source}: architecture {archs or None} / model_type {model_type!r} is not GPT-NeoX "
            f"(expected {ARCHITECTURE!r}, model_type {MODEL_TYPE!r})")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in hf]
    if missing:
        raise HFCheckpointError(f"{source}: missing field(s) {missing}")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise HFCheckpointError(
            f"{source}: hidden_act {act!r} is not supported (only exact 'gelu')")
    if hf.get("tie_word_embeddings", False):
        raise HFCheckpointError(f"{source}: tie_word_embeddings=true is not supported; GPT-NeoX "
                                f"here has separate input and output embeddings")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise HFCheckpointError(
            f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
    rotary_pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10_000.0)))
    try:
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]), rotary_pct=float(rotary_pct),
            rotary_emb_base=float(theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            attention_bias=bool(hf.get("attention_bias", True)),
            initializer_range=float(hf.get("initializer_range", 0.02)))
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"{source}: {e}") from e


def read_hf_config(hf_dir: str | os.PathLike) -> ModelConfig:
    """`model_config_from_hf` of `hf_dir/config.json`."""
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{path}: expected a JSON object")
    return model_config_from_hf(data, str(path))


def hf_config_dict(config: ModelConfig, vocab: Vocab, dtype: str = "float32") -> dict[str, Any]:
    """config.json for `GPTNeoXForCausalLM` (transformers 5.x layout plus the legacy rotary keys,
    which 5.x ignores when `rope_parameters` is present and 4.x reads)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_emb_base,
                            "partial_rotary_factor": config.rotary_pct},
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rotary_emb_base,
        "max_position_embeddings": config.max_position_embeddings,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": config.use_parallel_residual,
        "attention_bias": config.attention_bias,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": vocab.eos_id,
        "eos_token_id": vocab.eos_id,
        "pad_token_id": vocab.pad_id,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


# --------------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------------


class TensorReader:
    """Tensors of a checkpoint by HF name, each read on demand as a NumPy array."""

    def __init__(self, files: dict[str, pathlib.Path], open_file: Callable[[pathlib.Path], Any],
                 description: str):
        self._files = files  # tensor name -> file
        self._open_file = open_file
        self._handles: dict[pathlib.Path, Any] = {}
        self.description = description

    def keys(self) -> list[str]:
        return list(self._files)

    def file_of(self, key: str) -> pathlib.Path:
        return self._files[key]

    def _handle(self, key: str) -> Any:
        path = self._files[key]
        if path not in self._handles:
            self._handles[path] = self._open_file(path)
        return self._handles[path]

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, without reading its data."""
        return self._handle(key).shape(key)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _SafetensorsFile:
    def __init__(self, path: pathlib.Path):
        self.path = path
        self._f = _safe_open(path)

    def get(self, key: str) -> np.ndarray:
        return self._f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def close(self) -> None:
        self._f.__exit__(None, None, None)


class _TorchFile:
    """A `pytorch_model*.bin` loaded with `weights_only=True` (memory-mapped when possible)."""

    def __init__(self, path: pathlib.Path):
        try:
            import torch
        except ImportError as e:
            raise HFCheckpointError(f"{path}: reading PyTorch .bin checkpoints needs torch; "
                                    f"convert to safetensors or install torch") from e
        self._torch = torch
        try:
            try:  # memory-mapped: tensors are paged in one at a time
                self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # pre-zipfile (torch < 1.6) files cannot be memory-mapped
                self._state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad files
            # (torch's own message suggests weights_only=False, which this project never does)
            raise HFCheckpointError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}): "
                f"not a PyTorch state dict of plain tensors; convert it to safetensors") from e
        if not isinstance(self._state, dict):
            raise HFCheckpointError(
                f"{path}: expected a state dict, got {type(self._state).__name__}")

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def get(self, key: str) -> np.ndarray:
        t = self._state[key]
        if t.dtype == self._torch.bfloat16:
            return t.float().numpy()
        return t.numpy()

    def close(self) -> None:
        self._state = {}


def _safe_open(path: pathlib.Path) -> Any:
    try:
        f = safe_open(str(path), framework="numpy")
        return f.__enter__()
    except (SafetensorError, OSError, ValueError) as e:
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_index(index_path: pathlib.Path) -> dict[str, pathlib.Path]:
    try:
        data = json.loads(index_path.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise HFCheckpointError(f"{index_path}: not a valid checkpoint index ({e!r})") from e
    files = {k: index_path.parent / v for k, v in weight_map.items()}
    for name in sorted(set(weight_map.values())):
        if not (index_path.parent / name).is_file():
            users = sorted(k for k, v in weight_map.items() if v == name)
            raise HFCheckpointError(
                f"{index_path} names shard {name!r} (for {len(users)} tensors, e.g. {users[0]!r}) "
                f"but {index_path.parent / name} does not exist")
    return files


def open_weights(hf_dir: str | os.PathLike) -> TensorReader:
    """A `TensorReader` over the weight files of `hf_dir` (safetensors preferred)."""
    d = pathlib.Path(hf_dir)
    if (d / SAFETENSORS_INDEX).is_file():
        files = _read_index(d / SAFETENSORS_INDEX)
        for path in sorted(set(files.values())):  # every header is checked before any work
            _safe_open(path).__exit__(None, None, None)
        return TensorReader(files, _SafetensorsFile, str(d / SAFETENSORS_INDEX))
    if (d / SAFETENSORS_FILE).is_file():
        path = d / SAFETENSORS_FILE
        f = _safe_open(path)
        keys = list(f.keys())
        f.__exit__(None, None, None)
        return TensorReader({k: path for k in keys}, _SafetensorsFile, str(path))
    if (d / TORCH_INDEX).is_file():
        files = _read_index(d / TORCH_INDEX)
        return TensorReader(files, _TorchFile, str(d / TORCH_INDEX))
    if (d / TORCH_FILE).is_file():
        path = d / TORCH_FILE
        keys = _TorchFile(path).keys()
        return TensorReader({k: path for k in keys}, _TorchFile, str(path))
    raise FileNotFoundError(f"{d}: no weights found (looked for {SAFETENSORS_INDEX}, "
                            f"{SAFETENSORS_FILE}, {TORCH_INDEX}, {TORCH_FILE})")


def hf_shape(path: FlaxPath, config: ModelConfig) -> tuple[int, ...]:
    """Shape of the HF tensor (one layer's) that maps to Flax `path` under `config`."""
    e, h, d, m = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    leaf = path[-2:]
    if path[0] in ("embed_in", "embed_out"):
        return (config.vocab_size, e)
    if leaf == ("query_key_value", "kernel"):
        return (3 * h * d, e)
    if leaf == ("query_key_value", "bias"):
        return (3 * h * d,)
    if leaf == ("dense", "kernel"):
        return (e, h * d)
    if leaf == ("dense_h_to_4h", "kernel"):
        return (m, e)
    if leaf == ("dense_h_to_4h", "bias"):
        return (m,)
    if leaf == ("dense_4h_to_h", "kernel"):
        return (e, m)
    return (e,)  # LayerNorm scales and biases, the output biases


def _hf_keys_by_param(reader: TensorReader, config: ModelConfig
                      ) -> dict[FlaxPath, dict[int | None, str]]:
    """Flax path -> {layer index or None: HF name}, checking every expected tensor is there."""
    found: dict[FlaxPath, dict[int | None, str]] = {}
    for key in reader.keys():
        try:
            mapped = hf_mapping.hf_to_flax_key(key)
        except KeyError as e:
            raise HFCheckpointError(f"{reader.file_of(key)}: {e.args[0]}") from None
        if mapped is None:
            continue
        path, layer = mapped
        if layer is not None and layer >= config.num_layers:
            raise HFCheckpointError(
                f"{reader.file_of(key)}: tensor {key!r} is for layer {layer} but config.json has "
                f"num_hidden_layers={config.num_layers}")
        want, got = hf_shape(path, config), reader.shape(key)
        if want != got:
            raise HFCheckpointError(f"{reader.file_of(key)}: {key} has shape {list(got)} but "
                                    f"config.json implies {list(want)}")
        slot = found.setdefault(path, {})
        if layer in slot:
            raise HFCheckpointError(f"{reader.description}: both {slot[layer]!r} and {key!r} give "
                                    f"{'/'.join(path)}")
        slot[layer] = key
    missing = [hf for hf, path, layer in hf_mapping.flax_to_hf_keys(config)
               if layer not in found.get(path, {})]
    if missing:
        raise HFCheckpointError(f"{reader.description}: {len(missing)} tensor(s) missing, e.g. "
                                f"{missing[:3]}")
    return found


# --------------------------------------------------------------------------------------------------
# Vocabulary growth
# --------------------------------------------------------------------------------------------------


def grow_rows(old: np.ndarray, keep: int, rows: int, method: str, rng: np.random.Generator
              ) -> np.ndarray:
    """`rows` x embed matrix: `old[:keep]`, then new rows from the kept rows' statistics.

    `mean_cov`: transformers' default resize (N(mean, 1e-9 cov), the mean when the covariance is
    not positive definite); `mean`: the mean in every new row.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} not in {RESIZE_METHODS}")
    kept = old[:keep].astype(np.float32)
    added = rows - kept.shape[0]
    if added <= 0:
        return kept[:rows]
    mean = kept.mean(axis=0)
    new = np.broadcast_to(mean, (added, kept.shape[1]))
    if method == "mean_cov":
        centered = kept - mean
        cov = (centered.T @ centered) / kept.shape[0] * COVARIANCE_SCALE
        try:
            chol = np.linalg.cholesky(cov.astype(np.float64))
        except np.linalg.LinAlgError:
            chol = None
        if chol is not None:
            z = rng.standard_normal((added, kept.shape[1]))
            new = mean + (z @ chol.T).astype(np.float32)
    return np.concatenate([kept, new.astype(np.float32)], axis=0)


def rows_to_keep(ckpt_rows: int, vocab: Vocab, hf_dir: pathlib.Path) -> int:
    """How many leading checkpoint rows carry trained values (see module docstring)."""
    meta_path = hf_dir / vocab_lib.VOCAB_META_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            ours = (int(meta["n_text"]), int(meta["n_image"])) == (vocab.n_text, vocab.n_image)
        except (ValueError, KeyError, TypeError):
            ours = False
        if ours:
            return min(ckpt_rows, vocab.embed_rows)
    return min(ckpt_rows, vocab.n_text)


def check_tokenizer_fits(hf_dir: pathlib.Path, ckpt_rows: int) -> None:
    """The tokenizer's own ids (before we add the Dolly specials) must have embedding rows."""
    file = vocab_lib.resolve_tokenizer_file(hf_dir)
    try:
        n_ids = vocab_lib.text_size(Tokenizer.from_file(str(file)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise HFCheckpointError(f"{file}: not a valid tokenizers JSON file ({e})") from e
    if n_ids > ckpt_rows:
        raise HFCheckpointError(
            f"{file} has {n_ids} token ids but the checkpoint in {hf_dir} has only {ckpt_rows} "
            f"embedding rows: the tokenizer does not belong to these weights")


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _stacked_callback(reader: TensorReader, keys: dict[int | None, str], path: FlaxPath,
                      src: ModelConfig, dtype: Any) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Callback for `make_array_from_callback`: one device's shard of a layer-stacked param,
    read layer by layer (each HF layer tensor read once, kept only while this param is built)."""
    cache: dict[int, np.ndarray] = {}

    def layer(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = hf_mapping.hf_to_flax_tensor(path, reader.get(keys[i]), src).astype(dtype)
        return cache[i]

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        layers = range(src.num_layers)[index[0]]
        return np.stack([layer(i)[tuple(index[1:])] for i in layers])

    return callback


def import_hf(hf_dir: str | os.PathLike, mesh: Mesh, *, rules: Any = None,
              n_image: int | None = None, resize: str = "mean_cov", seed: int = 0,
              progress: bool = True) -> tuple[ModelConfig, Any, Vocab]:
    """Read an HF GPT-NeoX directory into params sharded on `mesh` by the logical-axis `rules`
    (default: the project's table). `n_image=None` takes the directory's saved vocabulary layout
    (`llmcxr_vocab.json`) or 1,024. Returns (config, params, vocab).
    """
    if resize not in RESIZE_METHODS:
        raise ValueError(f"--resize {resize!r} not in {RESIZE_METHODS}")
    hf_dir = pathlib.Path(hf_dir)
    src = read_hf_config(hf_dir)
    check_tokenizer_fits(hf_dir, src.vocab_size)
    vocab = Vocab.load(hf_dir, n_image=n_image)
    config = dataclasses.replace(src, vocab_size=vocab.embed_rows)
    keep = rows_to_keep(src.vocab_size, vocab, hf_dir)
    dtype = np.dtype(config.param_dtype)
    rng = np.random.default_rng(seed)
    target = shardings_lib.abstract_sharded_params(
        config, mesh=mesh, rules=shardings_lib.LOGICAL_AXIS_RULES if rules is None else rules)
    flat_target = dict(_flatten(target))
    params: dict = {}
    with open_weights(hf_dir) as reader:
        by_param = _hf_keys_by_param(reader, src)
        bar = tqdm(sorted(flat_target), desc=f"import {hf_dir.name}", disable=not progress)
        for path in bar:
            shape, sharding = flat_target[path].shape, flat_target[path].sharding
            keys = by_param[path]
            if path[0] == "layers":
                cb = _stacked_callback(reader, keys, path, src, dtype)
            else:
                host = reader.get(keys[None])
                if path in _VOCAB_PATHS:  # grow in HF's [rows, embed] layout, then map
                    host = grow_rows(host, keep, config.vocab_size, resize, rng)
                host = hf_mapping.hf_to_flax_tensor(path, host, config).astype(dtype)
                cb = (lambda h: lambda index: h[index])(host)
            _set(params, path, jax.make_array_from_callback(shape, sharding, cb))
    return config, params, vocab


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """Bytes of a size like `2GB`, `500MB`, `1GiB` or a plain integer (transformers' units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not like '2GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def plan_shards(entries: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy split of (name, bytes) in order into shards of at most `max_bytes` (a tensor larger
    than that gets a shard of its own), as transformers' sharding does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole (global) array on every process's host."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def export_hf(params: Params, config: ModelConfig, vocab: Vocab, out_dir: str | os.PathLike, *,
              max_shard_size: str | int = "2GB", dtype: str = "float32", overwrite: bool = False,
              progress: bool = True) -> pathlib.Path:
    """Write a transformers `GPTNeoXForCausalLM` directory (see module docstring); returns it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {sorted(DTYPES)}")
    if config.image_position_rows:
        raise HFCheckpointError("this model adds a learned image-position table to image tokens "
                                "(model.image_position_rows), which GPTNeoXForCausalLM has no "
                                "place for: use --format serving")
    if vocab.embed_rows != config.vocab_size:
        raise ValueError(f"vocabulary has {vocab.embed_rows} embedding rows but the model config "
                         f"has vocab_size={config.vocab_size}")
    out = pathlib.Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    main = jax.process_index() == 0
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    np_dtype = np.dtype(DTYPES[dtype])
    entries = [(EXPORT_RENAMES.get(k, k), p, l) for k, p, l in hf_mapping.flax_to_hf_keys(config)]
    flat = dict(_flatten(params))
    for _, path, _ in entries:
        if path not in flat:
            raise KeyError(f"params lack {'/'.join(path)}")

    def nbytes(path: FlaxPath, layer: int | None) -> int:
        shape = flat[path].shape[1:] if layer is not None else flat[path].shape
        return math.prod(shape) * np_dtype.itemsize

    shards = plan_shards([(k, nbytes(p, l)) for k, p, l in entries], parse_size(max_shard_size))
    lookup = {k: (p, l) for k, p, l in entries}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(entries), desc=f"export {out.name}", disable=not (progress and main))
    for name, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            path, layer = lookup[key]
            array = flat[path] if layer is None else flat[path][layer]
            host = hf_mapping.flax_to_hf_tensor(path, _to_host(array), config)
            tensors[key] = np.ascontiguousarray(host.astype(np_dtype))
            weight_map[key] = name
            total += tensors[key].nbytes
            bar.update(1)
        if main:
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    bar.close()
    if main:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(
            json.dumps(hf_config_dict(config, vocab, dtype), indent=2) + "\n")
        save_tokenizer(vocab, tmp, max_length=config.max_position_embeddings)
        replace_dir(tmp, out)
    _sync("export_hf")
    return out


def save_tokenizer(vocab: Vocab, directory: pathlib.Path, max_length: int | None = None) -> None:
    """transformers tokenizer files (AutoTokenizer loads them) + our `llmcxr_vocab.json`."""
    tokenizer = vocab.to_transformers()
    if max_length is not None:
        tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(directory))
    (directory / vocab_lib.VOCAB_META_FILE).write_text(json.dumps(vocab.meta(), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: FlaxPath = ()) -> Iterator[tuple[FlaxPath, Any]]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def _set(tree: dict, path: FlaxPath, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Move the finished directory `src` to `dst`, replacing an old `dst` only once `src` is
    complete (the old one is renamed aside first, then deleted)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
