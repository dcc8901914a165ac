"""Encode image datasets to VQ-GAN codes and decode codes back to images, in batches over all
devices.

Codes on disk (`CODES` directory, no pickle):

    CODES/index.json        format, VQ-GAN config, params digest, latent shape, shard list
    CODES/shard_00000.npz   `ids` (unicode array) and `codes` (uint16 [N, h, w]), one per flush
    CODES/failed.json       {path: reason} for the images that could not be used

Every file is written to a temporary name and renamed, shards before the index that lists them,
so an interrupted run leaves a consistent directory; a rerun skips the ids already present
(resume) and retries the failed ones. `load_codes(CODES)` gives {image id: uint16 [h, w]}.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import pathlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmcxr_jax import configs
from llmcxr_jax.configs import VQGANConfig
from llmcxr_jax.io_utils import atomic_write
from llmcxr_jax.data import images as image_lib
from llmcxr_jax.vqgan.model import VQGAN

FORMAT = "llmcxr_jax.vqgan_codes.v1"
INDEX_FILE = "index.json"
FAILED_FILE = "failed.json"
DATA_AXIS = "data"


# --------------------------------------------------------------------------------------------------
# Model and jitted functions
# --------------------------------------------------------------------------------------------------


def resolve_vqgan_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A training / import workdir (with `vqgan/`) or the checkpoint directory itself."""
    path = pathlib.Path(path)
    return path / "vqgan" if (path / "vqgan" / "config.json").is_file() else path


def params_digest(vqgan_dir: pathlib.Path) -> str:
    """sha256 of the checkpoint's params file: codes from other weights must not be mixed."""
    from llmcxr_jax.vqgan.checkpoint import PARAMS_FILE

    h = hashlib.sha256()
    with open(vqgan_dir / PARAMS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def device_mesh() -> Mesh:
    """A 1-D `data` mesh over this process's devices (all of them in a single-process run):
    encoding and decoding are per-image work of one host, also in a multi-process run."""
    return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,),
                axis_types=(jax.sharding.AxisType.Auto,))


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the data-axis size."""
    n = mesh.shape[DATA_AXIS]
    return -(-batch_size // n) * n


@functools.lru_cache(maxsize=8)
def make_encode_fn(config: VQGANConfig, mesh: Mesh) -> Callable[[Any, jax.Array], jax.Array]:
    """jitted (params, images [B, H, W, 3]) -> code indices int32 [B, h, w]; batch sharded.
    Cached per (config, mesh), so repeated runs in one process compile once."""
    model = VQGAN(config)
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))

    def encode(params, x):
        return model.apply({"params": params}, x, method=VQGAN.encode).indices

    return _placing_inputs(jax.jit(encode, in_shardings=(rep, batch), out_shardings=batch), batch)


@functools.lru_cache(maxsize=8)
def make_decode_fn(config: VQGANConfig, mesh: Mesh) -> Callable[[Any, jax.Array], jax.Array]:
    """jitted (params, indices [B, h, w]) -> images float32 [B, H, W, 3]; batch sharded."""
    model = VQGAN(config)
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))

    def decode(params, codes):
        return model.apply({"params": params}, codes.astype(jnp.int32), method=VQGAN.decode_code)

    return _placing_inputs(jax.jit(decode, in_shardings=(rep, batch), out_shardings=batch), batch)


def _placing_inputs(fn: Callable[[Any, jax.Array], jax.Array], batch: NamedSharding
                    ) -> Callable[[Any, Any], jax.Array]:
    """`fn` taking host arrays too: they are put on the batch sharding first (jit refuses a
    host array for a sharded input when the run has several processes)."""
    def placed(params, x):
        return fn(params, jax.device_put(x, batch))

    return placed


def load_model(vqgan: str | pathlib.Path, mesh: Mesh) -> tuple[VQGANConfig, Any, pathlib.Path]:
    """(config, params replicated on `mesh`, checkpoint dir) from a workdir or checkpoint dir."""
    from llmcxr_jax.vqgan.checkpoint import load_vqgan

    vqgan_dir = resolve_vqgan_dir(vqgan)
    config, params = load_vqgan(vqgan_dir)
    return config, jax.device_put(params, NamedSharding(mesh, P())), vqgan_dir


class Codec:
    """A VQ-GAN's encode and decode of host arrays: rows in fixed-size batches sharded over a 1-D
    `data` mesh (default `device_mesh()`), params replicated, the last batch zero-padded, so one
    compilation serves every call. The one batching path of training samples, generation, the
    evaluation and the codes drivers."""

    def __init__(self, config: VQGANConfig, params: Any, batch_size: int = 1,
                 mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh if mesh is not None else device_mesh()
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self.batch = padded_batch_size(batch_size, self.mesh)

    @classmethod
    def load(cls, vqgan: str | pathlib.Path, batch_size: int = 1) -> "Codec":
        """From a VQ-GAN training / import workdir or checkpoint directory."""
        mesh = device_mesh()
        config, params, _ = load_model(vqgan, mesh)
        return cls(config, params, batch_size, mesh)

    def _batched(self, fn: Callable[[Any, Any], jax.Array], x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            padded = np.zeros((self.batch, *x.shape[1:]), x.dtype)
            padded[:len(chunk)] = chunk
            out.append(np.asarray(jax.device_get(fn(self.params, padded)))[:len(chunk)])
        return np.concatenate(out)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images [N, H, W, 3] in [-1, 1] -> code indices int32 [N, h, w]."""
        return self._batched(make_encode_fn(self.config, self.mesh),
                             np.asarray(images, np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [N, h, w] or flat [N, h * w] -> images float32 [N, H, W, 3] in [-1, 1]."""
        side = self.config.latent_size
        codes = np.asarray(codes, np.int32).reshape(len(codes), side, side)
        return self._batched(make_decode_fn(self.config, self.mesh), codes)


# --------------------------------------------------------------------------------------------------
# The codes directory
# --------------------------------------------------------------------------------------------------


def _write_json(path: pathlib.Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def read_index(codes_dir: str | pathlib.Path) -> dict | None:
    path = pathlib.Path(codes_dir) / INDEX_FILE
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a codes index (format {index.get('format')!r}, want {FORMAT!r})")
    return index


def _read_shard(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["ids"], z["codes"]


def load_codes(codes_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{image id: uint16 codes [h, w]} from a codes directory."""
    codes_dir = pathlib.Path(codes_dir)
    index = read_index(codes_dir)
    if index is None:
        raise FileNotFoundError(f"{codes_dir}: no {INDEX_FILE} (not a codes directory)")
    out: dict[str, np.ndarray] = {}
    for shard in index["shards"]:
        ids, codes = _read_shard(codes_dir / shard)
        out.update(zip(ids.tolist(), codes))
    return out


class CodesWriter:
    """Appends codes to a codes directory in shards; knows which ids are already there."""

    def __init__(self, codes_dir: pathlib.Path, header: dict, shard_size: int = 4096):
        self.dir = pathlib.Path(codes_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        header = json.loads(json.dumps(header))  # compare as stored (tuples become lists)
        index = read_index(self.dir)
        if index is None:
            index = {"format": FORMAT, **header, "shards": [], "count": 0}
        else:
            for key in ("vqgan", "params_sha256", "latent_shape"):
                if index.get(key) != header[key]:
                    raise ValueError(f"{self.dir}: holds codes from another VQ-GAN ({key} differs); "
                                     f"use a new --out directory")
        self.index = index
        self.done: set[str] = set()
        for shard in index["shards"]:
            self.done.update(_read_shard(self.dir / shard)[0].tolist())
        failed_path = self.dir / FAILED_FILE
        self.failed: dict[str, str] = (json.loads(failed_path.read_text())
                                       if failed_path.is_file() else {})
        self._ids: list[str] = []
        self._codes: list[np.ndarray] = []

    def add(self, image_id: str, codes: np.ndarray, path: str) -> None:
        self._ids.append(image_id)
        self._codes.append(np.asarray(codes, np.uint16))
        self.done.add(image_id)
        self.failed.pop(path, None)
        if len(self._ids) >= self.shard_size:
            self.flush()

    def fail(self, path: str, reason: str) -> None:
        self.failed[path] = reason

    def flush(self) -> None:
        if self._ids:
            name = f"shard_{len(self.index['shards']):05d}.npz"
            ids = np.array(self._ids, dtype=np.str_)
            codes = np.stack(self._codes)
            atomic_write(self.dir / name, lambda tmp: _savez(tmp, ids, codes))
            self.index["shards"].append(name)
            self.index["count"] += len(ids)
            self._ids, self._codes = [], []
        _write_json(self.dir / INDEX_FILE, self.index)
        _write_json(self.dir / FAILED_FILE, self.failed)


def _savez(tmp: str, ids: np.ndarray, codes: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, ids=ids, codes=codes)


# --------------------------------------------------------------------------------------------------
# Encode / decode drivers
# --------------------------------------------------------------------------------------------------


def _load(path: pathlib.Path, size: int) -> np.ndarray | image_lib.ImageError:
    try:
        return image_lib.load_image(path, size)
    except image_lib.ImageError as e:
        return e
    except Exception as e:  # noqa: BLE001 - one bad file must never stop a dataset run
        return image_lib.ImageError(path, f"unexpected error while reading ({type(e).__name__}: {e})")


def encode_images(vqgan: str | pathlib.Path, sources: str | pathlib.Path | Sequence,
                  out: str | pathlib.Path, *, batch_size: int = 32, threads: int = 4,
                  shard_size: int = 4096, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Encode every image of `sources` (directory, list file, or paths) into the codes directory
    `out`. Resumable; unreadable images are skipped and listed in failed.json. Returns a summary."""
    vqgan_dir = resolve_vqgan_dir(vqgan)
    codec = Codec.load(vqgan_dir, batch_size)
    config = codec.config
    if config.n_embed > 65536:
        raise ValueError(f"n_embed {config.n_embed} does not fit uint16 codes")
    header = {"vqgan": configs.to_dict(config), "params_sha256": params_digest(vqgan_dir),
              "latent_shape": [config.latent_size, config.latent_size]}
    writer = CodesWriter(pathlib.Path(out), header, shard_size)
    paths = image_lib.list_images(sources)

    todo: list[tuple[str, pathlib.Path]] = []
    seen: dict[str, pathlib.Path] = {}
    already = 0
    for p in paths:
        image_id = image_lib.image_id(p)
        if image_id in seen:
            writer.fail(str(p), f"duplicate image id {image_id!r} (also {seen[image_id]})")
            continue
        seen[image_id] = p
        if image_id in writer.done:
            already += 1
        else:
            todo.append((image_id, p))

    batch = codec.batch
    size = config.resolution
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="img", dynamic_ncols=True, desc="encode")
    n_ok = n_bad = 0
    pending: collections.deque = collections.deque()
    ready: list[tuple[str, pathlib.Path, np.ndarray]] = []

    def run_batch(items):
        nonlocal n_ok
        codes = codec.encode(np.stack([img for _, _, img in items]))
        for (image_id, p, _), c in zip(items, codes):
            writer.add(image_id, c, str(p))
        n_ok += len(items)

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            queue = iter(todo)
            window = 4 * batch
            for image_id, p in _take(queue, window):
                pending.append((image_id, p, pool.submit(_load, p, size)))
            while pending:
                image_id, p, future = pending.popleft()
                for nxt in _take(queue, 1):
                    pending.append((*nxt, pool.submit(_load, nxt[1], size)))
                result = future.result()
                if isinstance(result, image_lib.ImageError):
                    writer.fail(str(p), result.reason)
                    n_bad += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                ready.append((image_id, p, result))
                if len(ready) == batch:
                    run_batch(ready)
                    if bar is not None:
                        bar.update(len(ready))
                    ready = []
            if ready:
                run_batch(ready)
                if bar is not None:
                    bar.update(len(ready))
    finally:
        if bar is not None:
            bar.close()
        writer.flush()
    summary = {"encoded": n_ok, "already_done": already, "failed": n_bad,
               "skipped_duplicates": sum(1 for r in writer.failed.values() if r.startswith("duplicate")),
               "total_in_codes": writer.index["count"], "out": str(out)}
    log(f"encode: {n_ok} encoded, {already} already in {out}, {n_bad} unreadable "
        f"(listed in {pathlib.Path(out) / FAILED_FILE}), {writer.index['count']} codes in total")
    for path, reason in sorted(writer.failed.items()):
        log(f"  skipped {path}: {reason}")
    return summary


def _take(it: Iterable, n: int) -> list:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


def decode_codes(vqgan: str | pathlib.Path, codes_dir: str | pathlib.Path,
                 out: str | pathlib.Path, *, batch_size: int = 32, ids: Sequence[str] | None = None,
                 grid_size: int = 64, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Decode codes to one PNG per image id in `out`, plus `grid.png` of the first `grid_size`."""
    codec = Codec.load(vqgan, batch_size)
    config = codec.config
    codes = load_codes(codes_dir)
    ids = sorted(codes) if ids is None else list(ids)
    missing = [i for i in ids if i not in codes]
    if missing:
        raise KeyError(f"{codes_dir}: no codes for ids {missing[:5]}{'...' if len(missing) > 5 else ''}")
    latent = (config.latent_size, config.latent_size)
    for i in ids:
        if codes[i].shape != latent:
            raise ValueError(f"{codes_dir}: codes of {i!r} have shape {codes[i].shape}, the VQ-GAN "
                             f"wants {latent}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch = codec.batch
    grid: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ids), unit="img", dynamic_ncols=True, desc="decode")
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        imgs = codec.decode(np.stack([codes[i] for i in chunk]))
        for image_id, img in zip(chunk, imgs):
            image_lib.save_png(out / f"{image_id}.png", img)
            if len(grid) < grid_size:
                grid.append(img)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if grid:
        image_lib.save_png(out / "grid.png", image_lib.image_grid(np.stack(grid)))
    log(f"decode: wrote {len(ids)} PNGs and grid.png to {out}")
    return {"decoded": len(ids), "out": str(out)}
