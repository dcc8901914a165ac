"""One training stage: data -> sharded steps -> metrics, evaluation, checkpoints, preemption.

A stage lives in its own directory (`WORKDIR/stage1`, `WORKDIR/stage2`):

    checkpoints/<step>/        orbax: train state, grain iterator position, bookkeeping
    metrics.jsonl, tensorboard/  the logged metrics; curves.png draws them at the end
    DONE.json                  written last; a stage with it is complete and is not rerun

`run_stage` resumes from the newest readable checkpoint when there is one, so a killed run picks
up exactly where its last checkpoint left it (same params, optimizer moments, PRNG and next batch).
Host syncs happen only at logging steps; everything else stays on the device queue.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any, Callable, TextIO

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from llmcxr_jax.configs import DataConfig, ModelConfig, TrainConfig
from llmcxr_jax.data import pipeline as pipeline_lib
from llmcxr_jax.eval import conditioning
from llmcxr_jax.io_utils import atomic_write_text
from llmcxr_jax.parallel.mesh import check_global_batch, is_main_process
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.text.vocab import Vocab
from llmcxr_jax.train import curves
from llmcxr_jax.train import flops as flops_lib
from llmcxr_jax.train.checkpoint import Checkpointer, abstract_train_state, restore_params
from llmcxr_jax.train.loss import summarize
from llmcxr_jax.train.metrics import TrainLogger
from llmcxr_jax.train.preemption import PreemptionWatcher
from llmcxr_jax.train.state import (Rules, abstract_params, init_state, param_shardings,
                                    state_from_params)
from llmcxr_jax.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)
DONE_FILE = "DONE.json"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long a stage runs and how often it logs, evaluates and saves."""

    steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end of the stage
    eval_batches: int = 2
    # Pairs per direction (of the train split and of the held-out one) whose conditioning gap
    # is measured at every evaluation; 0 = off.
    gap_pairs: int = 64
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # This stage's peak learning rate is train.learning_rate x this (a fine-tuning stage on a
    # small subset may want a gentler one than the stage before it).
    learning_rate_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.learning_rate_scale < float("inf"):
            raise ValueError(f"learning_rate_scale must be a finite number > 0, got "
                             f"{self.learning_rate_scale}")


@dataclasses.dataclass
class StageResult:
    stage: int
    status: str  # "done" | "preempted" | "reused"
    step: int
    params: Any
    summary: dict[str, Any]


def evaluate(eval_step: Callable, params: Any, batches: list[dict]) -> dict[str, Any]:
    """`loss.summarize` of the summed loss statistics over fixed held-out batches."""
    total: dict[str, Any] | None = None
    for batch in batches:
        sums = eval_step(params, batch)
        total = sums if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, sums)
    return jax.device_get(summarize(total))


def eval_batches(sources: pipeline_lib.Sources, vocab: Vocab, data_cfg: DataConfig,
                 train_cfg: TrainConfig, mesh: Mesh, n: int) -> list[dict]:
    """The first `n` batches of a pipeline over `sources` (the held-out split): fixed per run."""
    if n <= 0 or not any(sources.sizes().values()):
        return []
    it = pipeline_lib.build_pipeline(sources, vocab, data_cfg, seq_len=train_cfg.seq_len,
                                     global_batch=train_cfg.global_batch,
                                     loss_positions=train_cfg.logit_slots
                                     ).global_iterator(mesh)
    return [next(it) for _ in range(n)]


def gap_pair_sets(train_sources: pipeline_lib.Sources,
                  eval_sources: pipeline_lib.Sources | None, n: int, seed: int = 0
                  ) -> dict[str, tuple[str, list[dict]]]:
    """`gap/<direction>/<train|heldout>` -> (direction, up to `n` pairs in a seeded order) for
    every direction the sources hold pairs of: fixed per run, and the same on every process
    (the sources are not host-sharded), so each gap is one global program all processes run."""
    sets: dict[str, tuple[str, list[dict]]] = {}
    if n <= 0:
        return sets
    for split, sources in (("train", train_sources), ("heldout", eval_sources)):
        for direction in conditioning.DIRECTIONS:
            pairs = sources.records.get(direction, []) if sources is not None else []
            if len(pairs) >= 2:
                order = np.random.default_rng(seed).permutation(len(pairs))[:n]
                sets[f"gap/{direction}/{split}"] = (direction, [pairs[i] for i in order])
    return sets


def conditioning_gaps(params: Any, sets: dict[str, tuple[str, list[dict]]], *,
                      model_cfg: ModelConfig, vocab: Vocab, train_cfg: TrainConfig, mesh: Mesh,
                      rules: Rules) -> dict[str, float]:
    """The conditioning gap (nats per response token) of each set, and `gap_time_s`."""
    start, out = time.perf_counter(), {}
    for name, (direction, pairs) in sets.items():
        try:
            out[name] = conditioning.conditioning_gap(
                params, model_cfg, vocab, pairs, direction, batch_size=train_cfg.global_batch,
                max_len=train_cfg.seq_len, mesh=mesh, rules=rules).gap
        except ValueError as err:  # e.g. a tiny world whose pairs are mostly one study's
            log.warning("%s: not measured (%s)", name, err)
    if out:
        out["gap_time_s"] = time.perf_counter() - start
    return out


def run_stage(stage: int, *, model_cfg: ModelConfig, train_cfg: TrainConfig,
              data_cfg: DataConfig, loop_cfg: LoopConfig, mesh: Mesh, vocab: Vocab,
              train_sources: pipeline_lib.Sources, eval_sources: pipeline_lib.Sources | None,
              stage_dir: pathlib.Path, init_params: Any = None,
              watcher: PreemptionWatcher | None = None,
              stream: TextIO | None = sys.stdout,
              rules: Rules = LOGICAL_AXIS_RULES, reuse_done: bool = True) -> StageResult:
    """Train one stage to `loop_cfg.steps` steps (resuming if checkpoints exist).

    `init_params` (sharded params) starts a fresh optimizer around them (stage 2 from stage 1);
    None initialises at random. Returns the final params and a summary; `status="preempted"`
    when the watcher asked to stop (a checkpoint was saved first). A stage with DONE.json is
    reused as it is unless `reuse_done=False`: then it trains on from its latest checkpoint to
    `loop_cfg.steps` (a finished stage asked for more steps; `train/run.py` decides) and
    DONE.json is rewritten at the end.
    """
    stage_dir = pathlib.Path(stage_dir)
    done = stage_dir / DONE_FILE
    p_shard = param_shardings(model_cfg, mesh, rules)
    if reuse_done and done.exists():
        summary = json.loads(done.read_text())
        params = restore_params(stage_dir / "checkpoints", summary["step"], p_shard,
                                nn.unbox(abstract_params(model_cfg)))
        log.info("stage %d already complete at step %d (%s); reusing it", stage, summary["step"],
                 done)
        return StageResult(stage, "reused", summary["step"], params, summary)

    check_global_batch(train_cfg.global_batch, mesh)
    pipeline = pipeline_lib.build_pipeline(
        train_sources, vocab, data_cfg, seq_len=train_cfg.seq_len,
        global_batch=train_cfg.global_batch, loss_positions=train_cfg.logit_slots)
    data_iter = pipeline.global_iterator(mesh)
    held_out = eval_batches(eval_sources, vocab, dataclasses.replace(data_cfg, seed=1234),
                            train_cfg, mesh, loop_cfg.eval_batches) if eval_sources else []
    gap_sets = gap_pair_sets(train_sources, eval_sources, loop_cfg.gap_pairs)
    gaps = functools.partial(conditioning_gaps, sets=gap_sets, model_cfg=model_cfg, vocab=vocab,
                             train_cfg=train_cfg, mesh=mesh, rules=rules)
    step_fn = make_train_step(model_cfg, train_cfg, mesh, len(pipeline_lib.TASKS), rules)
    eval_fn = make_eval_step(model_cfg, mesh, len(pipeline_lib.TASKS), rules)

    ckpt = Checkpointer(stage_dir / "checkpoints", save_every=loop_cfg.checkpoint_every,
                        keep=loop_cfg.keep_checkpoints)
    restored = ckpt.restore_latest(abstract_train_state(model_cfg, train_cfg, mesh, rules),
                                   data_iter)
    if restored is not None:
        state = restored.state
        log.info("stage %d: resumed from checkpoint step %d", stage, restored.step)
    elif init_params is not None:
        state = state_from_params(init_params, model_cfg, train_cfg, mesh, rules)
    else:
        state = init_state(model_cfg, train_cfg, mesh, rules)

    step = int(jax.device_get(state.step))
    logger = TrainLogger(stage_dir, stage=stage, total_steps=loop_cfg.steps, model_cfg=model_cfg,
                         global_batch=train_cfg.global_batch, seq_len=train_cfg.seq_len,
                         task_names=pipeline_lib.TASKS, log_every=loop_cfg.log_every,
                         n_devices=mesh.devices.size,
                         peak_flops=flops_lib.device_peak_flops(list(mesh.devices.flat)),
                         stream=stream)
    status, summary = "done", {}
    try:
        while step < loop_cfg.steps:
            state, metrics = step_fn(state, next(data_iter))
            step += 1
            eval_now = bool(loop_cfg.eval_every) and step % loop_cfg.eval_every == 0
            eval_now = eval_now and bool(held_out or gap_sets) and step != loop_cfg.steps
            record = logger.add(
                step, metrics,
                evaluate(eval_fn, state.params, held_out) if eval_now and held_out else None,
                extra=gaps(state.params) if eval_now and gap_sets else None)
            if step == 1:
                logger.start()  # the first step's compile time is not throughput
            summary = record or summary
            ckpt.save(step, state, data_iter, {"stage": stage})
            if watcher is not None and watcher.should_stop(step):
                logger.flush(step)
                ckpt.save(step, state, data_iter, {"stage": stage}, force=True)
                status = "preempted"
                break
        if status == "done":
            final = logger.flush(step, evaluate(eval_fn, state.params, held_out)
                                 if held_out else None,
                                 extra=gaps(state.params) if gap_sets else None)
            # Examples the pipeline dropped (too long for a row, or for its loss positions),
            # by task and reason, as this process met them.
            dropped = pipeline.drops.as_dict()
            if dropped:
                log.info("stage %d: examples dropped by the pipeline: %s", stage, dropped)
            summary = {**summary, **(final or {}), "stage": stage, "step": step,
                       "skipped_steps": int(jax.device_get(state.skipped_steps)),
                       "dropped_examples": dropped}
            ckpt.save(step, state, data_iter, {"stage": stage}, force=True)
    finally:
        ckpt.close()
        logger.close()
    if status == "done" and is_main_process():
        curves.write_stage_curves(stage_dir, stage)  # curves.png: loss, lr, tokens/s, gaps
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in summary.items()}  # strict JSON: no NaN (tasks absent from a stage)
        atomic_write_text(done, json.dumps(finite, indent=2, sort_keys=True, allow_nan=False))
    return StageResult(stage, status, step, state.params, summary)
