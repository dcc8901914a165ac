"""Orbax checkpoints of a training run: train state, data iterator state and host bookkeeping.

Each step directory `WORKDIR/checkpoints/<step>/` holds three items:

- `state`: the `TrainState` (params, Adam moments, step, skipped-step count), each
  array saved by the processes that own its shards (orbax `StandardSave`), and restored straight
  into whatever shardings the caller asks for (the same mesh or another one);
- `data`: the grain iterator's position (`grain.checkpoint.CheckpointSave`, one JSON per process);
- `meta`: a small JSON dict for host-side bookkeeping (stage, data epoch, ...).

Saves are asynchronous: `save` returns once the arrays are copied off the devices (so the next
train step may donate the state) and the files are written in the background. Orbax writes into
`<step>.orbax-checkpoint-tmp-<time>` and renames to `<step>` only when every item is complete, so a
crash mid-save never leaves a directory that looks finished; leftover tmp directories are removed
when the manager opens the directory. A finished checkpoint that cannot be read (a file deleted or
corrupted later) is reported in one log line and the previous one is restored instead.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from llmcxr_jax.configs import ModelConfig, TrainConfig
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.train.optimizer import make_optimizer
from llmcxr_jax.train.state import Rules, TrainState, abstract_params, state_shardings

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")
UNREADABLE_SUFFIX = ".unreadable"


# Leaves that checkpoints of older versions hold in their `TrainState` and the current one does
# not: read (the restore target must match the saved tree) and dropped. `rng` was raw PRNG key
# data that nothing ever read.
DROPPED_STATE_FIELDS = {"rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` gives back (the data iterator is restored in place)."""

    step: int
    state: TrainState
    meta: dict[str, Any]


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s of `abstract` carrying the matching leaf of `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def abstract_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
                         rules: Rules = LOGICAL_AXIS_RULES) -> TrainState:
    """The `TrainState` as `ShapeDtypeStruct`s with their target shardings; nothing allocated.

    The restore target here, and the argument of `.lower()` in memory planning.
    """
    import flax.linen as nn

    params = nn.unbox(abstract_params(model_cfg))
    opt_state = jax.eval_shape(make_optimizer(train_cfg).init, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = TrainState(step=scalar, params=params, opt_state=opt_state, skipped_steps=scalar)
    return with_shardings(shapes, state_shardings(model_cfg, train_cfg, mesh, rules))


class Checkpointer:
    """Periodic asynchronous checkpoints of one run, keeping the last `keep`.

    `save_every` steps (and whenever `save(..., force=True)` is called, e.g. at the end or on
    preemption); `restore_latest` resumes from the newest readable checkpoint.
    """

    def __init__(self, directory: str | pathlib.Path, *, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True) -> None:
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every {save_every} and keep {keep} must be >= 1")
        self.directory = epath.Path(directory).absolute()
        self.save_every = save_every
        self.keep = keep
        self._async = async_save
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=self._async)
        manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        # Orbax removes crash leftovers (`<step>.orbax-checkpoint-tmp-*`) in the background and
        # waits for that only on the next save; wait now so the directory is settled on return.
        await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        return manager

    # ---------------------------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Steps of the finished (committed) checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step (not checked for readability), or None."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0

    # ------------------------------------------------------------------------------------ save

    def save(self, step: int, state: TrainState, data_iter: grain.DatasetIterator | None = None,
             meta: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Start saving `state` (+ iterator position + `meta`) as `step` if it is a save step or
        `force`; returns whether a save started. The iterator's state is read now, so call this
        before taking the next batch. A checkpoint already at `step` is left as it is."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state),
                                 "meta": ocp.args.JsonSave(dict(meta or {}))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Block until every started save is on disk (and raise if one failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------------------------- restore

    def restore(self, step: int, target: TrainState,
                data_iter: grain.DatasetIterator | None = None) -> Restored:
        """Restore `step` into `target`'s shardings (`abstract_train_state`), and the iterator's
        position into `data_iter` in place. Raises whatever orbax raises for a damaged step."""
        dropped = self._dropped_fields(step) if isinstance(target, TrainState) else {}
        if dropped:  # an older checkpoint: restore its whole tree, then drop the extra leaves
            replicated = target.step.sharding
            target = {**{f.name: getattr(target, f.name) for f in dataclasses.fields(target)},
                      **{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
                         for k, v in dropped.items()}}
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target),
                                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = out["state"]
        if dropped:
            state = TrainState(**{k: v for k, v in state.items() if k not in dropped})
        return Restored(step=step, state=state, meta=dict(out["meta"] or {}))

    def _dropped_fields(self, step: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The `DROPPED_STATE_FIELDS` that checkpoint `step`'s saved state holds."""
        tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree
        return {k: v for k, v in DROPPED_STATE_FIELDS.items()
                if isinstance(tree, Mapping) and k in tree}

    def restore_latest(self, target: TrainState,
                       data_iter: grain.DatasetIterator | None = None) -> Restored | None:
        """The newest readable checkpoint, or None when there is none at all.

        An unreadable newer checkpoint is logged (one line naming the step and the error) and
        renamed to `<step>.unreadable` so that the resumed run can save that step again; if every
        checkpoint is unreadable, `CheckpointError` is raised rather than starting from scratch.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failures: list[str] = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, target, data_iter)
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                reason = f"{type(err).__name__}: {_first_line(err)}"
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                            step, self.directory, reason)
                failures.append(f"step {step}: {reason}")
                continue
            if failures:
                self._set_aside([s for s in steps if s > step])
            return restored
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable step directories so orbax no longer lists them (process 0 only)."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src = self.directory / str(step)
                if src.exists():
                    dst = self.directory / f"{step}{UNREADABLE_SUFFIX}-{stamp}"
                    src.rename(dst)
                    log.warning("moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("llmcxr_checkpoint_set_aside")
        self._manager.reload()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else repr(err)


def restore_params(directory: str | pathlib.Path, step: int | None, param_shardings: Any,
                   abstract: Any = None) -> Any:
    """Only the params of checkpoint `step` (None: the latest) of a run's checkpoint directory,
    restored into `param_shardings`; e.g. stage 2 starts from stage 1's final params.

    Shapes and dtypes come from the checkpoint's metadata unless `abstract` (a tree of arrays or
    ShapeDtypeStructs shaped like the params) is given; the Adam moments are not read.
    """
    directory = epath.Path(directory).absolute()
    manager = ocp.CheckpointManager(
        directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise CheckpointError(f"no finished checkpoint in {directory}")
        elif step not in manager.all_steps():
            raise CheckpointError(f"no finished checkpoint for step {step} in {directory}; "
                                  f"steps: {sorted(manager.all_steps())}")
        if abstract is None:
            saved = manager.item_metadata(step)["state"].tree["params"]
            abstract = jax.tree.map(lambda _, m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                    param_shardings, saved)
        target = {"params": with_shardings(abstract, param_shardings)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    finally:
        manager.close()
    return out["state"]["params"]
