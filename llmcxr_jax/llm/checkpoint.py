"""The project's LLM checkpoint: a workdir holding config, tokenizer and orbax params.

    WORKDIR/config.json                {"model": ModelConfig fields, "vocab": Vocab.meta()}
    WORKDIR/tokenizer/                 tokenizer.json + llmcxr_vocab.json (`Vocab.save`)
    WORKDIR/checkpoints/<step>/state/  orbax `StandardSave` of {"params": params}

`checkpoints/` is an orbax `CheckpointManager` directory laid out like a training run's
(`llmcxr_jax.train.checkpoint`): its "state" item holds a tree with a "params" entry, here alone, in
a run beside the optimizer state. So a trainer can start from an imported workdir with its own
params-only restore, and `load_llm` (hence `launch/export.py`) reads a training run's params too, by
a partial restore of `state["params"]`. `save_llm` builds the whole workdir in `WORKDIR.tmp` and
renames it when complete, so a crash leaves nothing half-written. Restoring goes straight into the
given shardings: no device ever holds the whole model.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from llmcxr_jax import configs
from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm.hf_io import replace_dir
from llmcxr_jax.llm.model import Params
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.text.vocab import Vocab

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"  # the item name a training run uses for its TrainState
PARAMS_KEY = "params"


class CheckpointError(ValueError):
    """A workdir that does not hold a loadable LLM checkpoint."""


def checkpoint_manager(workdir: str | pathlib.Path, create: bool = True) -> ocp.CheckpointManager:
    """The orbax manager of `WORKDIR/checkpoints` with the "state" item (synchronous saves)."""
    options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINT_DIR,
                                 options=options, item_names=(STATE_ITEM,))


def config_dict(config: ModelConfig, vocab: Vocab) -> dict[str, Any]:
    return {"model": configs.to_dict(config), "vocab": vocab.meta()}


def save_llm(workdir: str | pathlib.Path, config: ModelConfig, params: Params, vocab: Vocab, *,
             step: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Write a complete LLM workdir (see module docstring); every process must call it."""
    workdir = pathlib.Path(workdir)
    if vocab.embed_rows != config.vocab_size:
        raise ValueError(f"vocabulary has {vocab.embed_rows} embedding rows but the model config "
                         f"has vocab_size={config.vocab_size}")
    if workdir.exists() and any(workdir.iterdir()) and not overwrite:
        raise FileExistsError(f"{workdir} exists and is not empty; pass overwrite=True "
                              f"(--overwrite) to replace it")
    tmp = workdir.with_name(workdir.name + ".tmp")
    main = jax.process_index() == 0
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _sync("save_llm:start")
    manager = checkpoint_manager(tmp)
    manager.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave({PARAMS_KEY: params})}))
    manager.wait_until_finished()
    manager.close()
    if main:
        vocab.save(tmp / TOKENIZER_DIR)
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict(config, vocab), indent=2) + "\n")
        replace_dir(tmp, workdir)
    _sync("save_llm:done")
    return workdir


def read_llm_config(workdir: str | pathlib.Path) -> tuple[ModelConfig, Vocab]:
    """The model config and vocabulary of a workdir, checked against each other."""
    workdir = pathlib.Path(workdir)
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {workdir} is not an LLM workdir")
    try:
        data = json.loads(path.read_text())
        config = configs.from_dict(ModelConfig, data["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no valid 'model' config ({e!r})") from e
    vocab = Vocab.load(workdir / TOKENIZER_DIR)
    if vocab.embed_rows != config.vocab_size:
        raise CheckpointError(f"{workdir / TOKENIZER_DIR} gives {vocab.embed_rows} embedding rows "
                              f"but {path} has vocab_size={config.vocab_size}")
    return config, vocab


def load_llm(workdir: str | pathlib.Path, shardings: Any = None, *, mesh: Mesh | None = None,
             step: int | None = None) -> tuple[ModelConfig, Params, Vocab]:
    """(config, params, vocab) of a workdir; params restored straight into `shardings`.

    Without `shardings`, they follow the logical-axis rules on `mesh` (default: every device on
    the fsdp axis). `step=None` takes the latest step.
    """
    workdir = pathlib.Path(workdir)
    config, vocab = read_llm_config(workdir)
    if shardings is None and mesh is None:
        from llmcxr_jax.parallel.mesh import mesh_from_flag

        mesh = mesh_from_flag("-1")
    if not (workdir / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(f"{workdir / CHECKPOINT_DIR} not found: no params in {workdir}")
    manager = checkpoint_manager(workdir, create=False)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(f"{workdir / CHECKPOINT_DIR}: step {step} not found; steps "
                                  f"present: {list(manager.all_steps())}")
        target = {PARAMS_KEY: shardings_lib.abstract_sharded_params(config, shardings, mesh)}
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)  # a training run's state has more than the params
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: restore}))
    finally:
        manager.close()
    return config, restored[STATE_ITEM][PARAMS_KEY], vocab


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
