"""Serving bundles: export a trained model as one self-contained folder, and open any model folder.

A serving folder is an LLM workdir (`llmcxr_jax.llm.checkpoint`) plus the VQ-GAN:

    OUT/config.json                {"model", "vocab", "serving": {format, param_dtype, source,
                                   guidance, image_temperature, ...}}
    OUT/tokenizer/                 tokenizer.json + llmcxr_vocab.json
    OUT/checkpoints/<step>/state/  orbax sharded checkpoint of {"params": params} (no optimizer)
    OUT/vqgan/                     config.json + params.safetensors (a copy of the save_vqgan dir)

Params may be cast to bfloat16 on export (the config's `param_dtype` says so, and restoring gives
bfloat16 arrays). Because the checkpoint is orbax's sharded format and the restore target is built
from the logical-axis rules on the *serving* mesh, a model trained on a 4x4 mesh restores onto one
device or a 2x2 mesh without ever being gathered on one host. The folder is written as `OUT.tmp`
and renamed when complete, so an interrupted export leaves nothing half-written.

`load_bundle(path, mesh)` opens any of the three layouts the project produces:

    a training run's workdir   WORKDIR/llm (final LLM) + WORKDIR/vqgan_run/vqgan (or the run's
                               `vqgan_dir` from WORKDIR/config.json)
    an LLM workdir             config.json + tokenizer/ + checkpoints/ (`launch/import_hf.py`,
                               `save_llm`); a VQ-GAN only if it has `vqgan/` or one is given
    a serving folder           as above, with `vqgan/`
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llmcxr_jax.configs import ModelConfig, VQGANConfig
from llmcxr_jax.llm import checkpoint as llm_checkpoint
from llmcxr_jax.llm.hf_io import replace_dir
from llmcxr_jax.llm.model import Params
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.text.vocab import Vocab

SERVING_FORMAT = "llmcxr_jax.serving.v1"
SERVING_KEY = "serving"
VQGAN_DIR = "vqgan"
PARAM_DTYPES = ("float32", "bfloat16")
KINDS = ("run", "llm", "serving")


class BundleError(ValueError):
    """A path without a loadable model; the message names the path and what is missing."""


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Everything inference needs, from one folder.

    `params` are restored into the logical-axis shardings on the requested mesh. The VQ-GAN
    (small, used whole on every device) is given as host NumPy params: place them as the caller's
    jitted functions want (e.g. `jax.device_put(p, replicated)`). `vqgan_config`/`vqgan_params`
    are None when the folder holds no VQ-GAN and none was given.
    """

    kind: str  # "run" | "llm" | "serving"
    path: pathlib.Path  # what was opened
    llm_dir: pathlib.Path  # the LLM workdir inside it
    model_config: ModelConfig
    params: Params
    vocab: Vocab
    step: int
    vqgan_dir: pathlib.Path | None = None
    vqgan_config: VQGANConfig | None = None
    vqgan_params: Any = None
    # How report -> image samples with this model by default: a run's `guidance` scale and
    # `image_temperature` (WORKDIR/config.json), carried into its serving exports; 1 and 1 (plain
    # sampling) for other folders.
    guidance: float = 1.0
    image_temperature: float = 1.0

    @property
    def has_vqgan(self) -> bool:
        return self.vqgan_config is not None

    def require_vqgan(self, why: str) -> tuple[VQGANConfig, Any]:
        """(config, params), or a BundleError naming the folder and how to supply one."""
        if self.vqgan_config is None:
            raise BundleError(f"{self.path} holds no VQ-GAN ({why}); pass --vqgan DIR (a "
                              f"save_vqgan / import_taming directory)")
        return self.vqgan_config, self.vqgan_params


# --------------------------------------------------------------------------------------------------
# Finding the parts of a folder
# --------------------------------------------------------------------------------------------------


def _is_llm_dir(path: pathlib.Path) -> bool:
    config = path / llm_checkpoint.CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return False
    return isinstance(data, dict) and "model" in data and "vocab" in data


def _has_vqgan(path: pathlib.Path) -> bool:
    from llmcxr_jax.vqgan.checkpoint import CONFIG_FILE, PARAMS_FILE

    return (path / CONFIG_FILE).is_file() and (path / PARAMS_FILE).is_file()


def _run_vqgan_dir(run: RunLayout) -> pathlib.Path | None:
    """A training run's VQ-GAN: its config's `vqgan_dir` when set, else the one it trained."""
    from llmcxr_jax.vqgan.encode import resolve_vqgan_dir

    try:
        given = json.loads(run.config.read_text()).get("vqgan_dir", "")
    except (OSError, ValueError, AttributeError):
        given = ""
    if given:
        return resolve_vqgan_dir(given)
    return run.vqgan if _has_vqgan(run.vqgan) else None


IMAGE_SAMPLING_KEYS = ("guidance", "image_temperature")  # Bundle fields, run config keys


def _image_sampling(kind: str, root: pathlib.Path, llm_dir: pathlib.Path) -> dict[str, float]:
    """`Bundle.guidance` and `.image_temperature`: a run's config values, a serving folder's
    `serving` block, else 1 each (a missing or malformed value is 1 too)."""
    defaults = dict.fromkeys(IMAGE_SAMPLING_KEYS, 1.0)
    if kind == "llm":
        return defaults
    path = RunLayout(root).config if kind == "run" else llm_dir / llm_checkpoint.CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return defaults
    if kind == "serving":
        data = data.get(SERVING_KEY)
    if not isinstance(data, dict):
        return defaults
    return {key: float(value) if isinstance(value := data.get(key), (int, float)) else 1.0
            for key in IMAGE_SAMPLING_KEYS}


def locate(path: str | pathlib.Path) -> tuple[str, pathlib.Path, pathlib.Path | None]:
    """(kind, LLM workdir, VQ-GAN dir or None) of a run workdir, LLM workdir or serving folder.

    Raises BundleError naming the path and what is missing.
    """
    root = pathlib.Path(path)
    if not root.exists():
        raise BundleError(f"{root} does not exist (expected a training-run workdir, an LLM "
                          f"workdir or a serving folder)")
    if not root.is_dir():
        raise BundleError(f"{root} is a file, not a model folder")
    run = RunLayout(root)
    if _is_llm_dir(run.llm):
        return "run", run.llm, _run_vqgan_dir(run)
    if _is_llm_dir(root):
        data = json.loads((root / llm_checkpoint.CONFIG_FILE).read_text())
        vqgan = root / VQGAN_DIR
        kind = "serving" if SERVING_KEY in data else "llm"
        return kind, root, vqgan if _has_vqgan(vqgan) else None
    if run.is_run():
        raise BundleError(f"{root} is a training-run workdir without a final LLM: "
                          f"{run.llm / llm_checkpoint.CONFIG_FILE} is missing (run launch/train.py "
                          f"until both stages finish)")
    raise BundleError(f"{root} holds no LLM: neither {root / llm_checkpoint.CONFIG_FILE} (an LLM "
                      f"workdir or serving folder) nor {run.llm / llm_checkpoint.CONFIG_FILE} (a "
                      f"training run) is an LLM config")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_bundle(path: str | pathlib.Path, mesh: Mesh | None = None, *,
                vqgan: str | pathlib.Path | None = None, step: int | None = None,
                rules: Any = LOGICAL_AXIS_RULES, load_vqgan: bool = True) -> Bundle:
    """Open a training-run workdir, an LLM workdir or a serving folder (see module docstring).

    Args:
      path: the folder.
      mesh: the mesh to restore the LLM params onto (default: every device on the fsdp axis);
        any mesh works, whatever mesh the params were saved from.
      vqgan: a VQ-GAN directory (or a workdir holding `vqgan/`) overriding the folder's own.
      step: the checkpoint step (default: the latest).
      rules: the logical-axis rules that map params to the mesh.
      load_vqgan: False skips reading the VQ-GAN params (its directory is still located).

    Returns a `Bundle`. Raises BundleError naming the path when something is missing.
    """
    from llmcxr_jax.vqgan import checkpoint as vqgan_checkpoint
    from llmcxr_jax.vqgan.encode import resolve_vqgan_dir

    kind, llm_dir, vqgan_dir = locate(path)
    if vqgan is not None:
        vqgan_dir = resolve_vqgan_dir(vqgan)
        if not _has_vqgan(vqgan_dir):
            raise BundleError(f"--vqgan {vqgan}: no VQ-GAN there (expected config.json and "
                              f"params.safetensors in {vqgan_dir})")
    if mesh is None:
        from llmcxr_jax.parallel.mesh import mesh_from_flag

        mesh = mesh_from_flag("-1")
    try:
        config, _ = llm_checkpoint.read_llm_config(llm_dir)
        shardings = shardings_lib.param_shardings(config, mesh, rules)
        step = _resolve_step(llm_dir, step)
        config, params, vocab = llm_checkpoint.load_llm(llm_dir, shardings, step=step)
    except llm_checkpoint.CheckpointError as e:
        raise BundleError(str(e)) from e
    vq_config = vq_params = None
    if vqgan_dir is not None and load_vqgan:
        try:
            vq_config, vq_params = vqgan_checkpoint.load_vqgan(vqgan_dir)
        except (FileNotFoundError, ValueError) as e:
            raise BundleError(f"VQ-GAN of {path}: {e}") from e
        if vq_config.n_embed != vocab.n_image:
            raise BundleError(f"the VQ-GAN in {vqgan_dir} has {vq_config.n_embed} codes but the "
                              f"vocabulary in {llm_dir / llm_checkpoint.TOKENIZER_DIR} has "
                              f"{vocab.n_image} image ids")
    elif vqgan_dir is not None:
        vq_config = vqgan_checkpoint.load_config(vqgan_dir)
    return Bundle(kind=kind, path=pathlib.Path(path), llm_dir=llm_dir, model_config=config,
                  params=params, vocab=vocab, step=step, vqgan_dir=vqgan_dir,
                  vqgan_config=vq_config, vqgan_params=vq_params,
                  **_image_sampling(kind, pathlib.Path(path), llm_dir))


def _resolve_step(llm_dir: pathlib.Path, step: int | None) -> int:
    ckpt = llm_dir / llm_checkpoint.CHECKPOINT_DIR
    if not ckpt.is_dir():
        raise BundleError(f"{ckpt} not found: no params in {llm_dir}")
    manager = llm_checkpoint.checkpoint_manager(llm_dir, create=False)
    try:
        steps = list(manager.all_steps())
        chosen = manager.latest_step() if step is None else step
    finally:
        manager.close()
    if chosen is None or chosen not in steps:
        raise BundleError(f"{ckpt}: step {chosen} not found; steps present: {steps}")
    return int(chosen)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def cast_params(params: Params, dtype: str) -> Params:
    """Every floating param cast to `dtype` (shardings kept)."""
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"param dtype {dtype!r} not in {PARAM_DTYPES}")
    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def export_serving(out: str | pathlib.Path, config: ModelConfig, params: Params, vocab: Vocab, *,
                   vqgan_dir: str | pathlib.Path | None = None, param_dtype: str | None = None,
                   step: int = 0, source: str = "", overwrite: bool = False,
                   guidance: float = 1.0, image_temperature: float = 1.0) -> pathlib.Path:
    """Write a serving folder (module docstring): params only, optionally cast to `param_dtype`,
    plus a copy of the VQ-GAN at `vqgan_dir` (None: an LLM-only folder) and the tokenizer;
    `guidance` and `image_temperature` are the model's report -> image sampling defaults
    (`Bundle.guidance`, `Bundle.image_temperature`).

    Every process must call it (orbax writes each process's shards); process 0 writes the rest.
    """
    from llmcxr_jax.vqgan import checkpoint as vqgan_checkpoint

    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if vqgan_dir is not None:
        vqgan_dir = pathlib.Path(vqgan_dir)
        if not _has_vqgan(vqgan_dir):
            raise BundleError(f"no VQ-GAN in {vqgan_dir} (expected {vqgan_checkpoint.CONFIG_FILE} "
                              f"and {vqgan_checkpoint.PARAMS_FILE})")
        n_embed = vqgan_checkpoint.load_config(vqgan_dir).n_embed
        if n_embed != vocab.n_image:
            raise BundleError(f"the VQ-GAN in {vqgan_dir} has {n_embed} codes but the vocabulary "
                              f"has {vocab.n_image} image ids")
    param_dtype = param_dtype or config.param_dtype
    if param_dtype != config.param_dtype:
        params = cast_params(params, param_dtype)
        config = dataclasses.replace(config, param_dtype=param_dtype)
    tmp = out.with_name(out.name + ".tmp")
    main = jax.process_index() == 0
    if main and tmp.exists():
        shutil.rmtree(tmp)
    llm_checkpoint.save_llm(tmp, config, params, vocab, step=step)
    if main:
        meta = {"format": SERVING_FORMAT, "param_dtype": param_dtype, "source": str(source),
                "step": step, "vqgan": VQGAN_DIR if vqgan_dir is not None else None,
                "guidance": guidance, "image_temperature": image_temperature}
        if vqgan_dir is not None:
            (tmp / VQGAN_DIR).mkdir()
            for name in (vqgan_checkpoint.PARAMS_FILE, vqgan_checkpoint.CONFIG_FILE):
                shutil.copyfile(vqgan_dir / name, tmp / VQGAN_DIR / name)
        data = {**llm_checkpoint.config_dict(config, vocab), SERVING_KEY: meta}
        (tmp / llm_checkpoint.CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
        replace_dir(tmp, out)
    _sync("export_serving:done")
    return out


def export_bundle(bundle: Bundle, out: str | pathlib.Path, *, param_dtype: str | None = None,
                  overwrite: bool = False) -> pathlib.Path:
    """`export_serving` of an opened bundle (its VQ-GAN included when it has one)."""
    return export_serving(out, bundle.model_config, bundle.params, bundle.vocab,
                          vqgan_dir=bundle.vqgan_dir, param_dtype=param_dtype, step=bundle.step,
                          source=str(bundle.path), overwrite=overwrite, guidance=bundle.guidance,
                          image_temperature=bundle.image_temperature)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def serving_meta(path: str | pathlib.Path) -> dict[str, Any] | None:
    """The `serving` section of a folder's config.json (None for other folders)."""
    config = pathlib.Path(path) / llm_checkpoint.CONFIG_FILE
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get(SERVING_KEY)


__all__ = ["Bundle", "BundleError", "KINDS", "SERVING_FORMAT", "cast_params", "export_bundle",
           "export_serving", "load_bundle", "locate", "serving_meta"]
