"""The jitted train and eval steps: explicit in/out shardings, donated state.

One step = `grad_accum_steps` micro-batches (a `lax.scan` inside the step), one AdamW update.
A step whose loss or gradient norm is not finite is skipped: the state keeps its params and
optimizer moments, `step` and `skipped_steps` advance, and the metrics say `skipped = 1`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from llmcxr_jax.configs import ModelConfig, TrainConfig
from llmcxr_jax.data.pipeline import BATCH_KEYS
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.parallel.shardings import batch_sharding
from llmcxr_jax.train.loss import loss_slots, loss_sums, summarize
from llmcxr_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llmcxr_jax.train.state import Rules, TrainState, state_shardings

Batch = dict[str, jax.Array]


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """Every [batch, length] field of a training batch in the one batch layout."""
    return {k: batch_sharding(mesh) for k in BATCH_KEYS}


def _micro_sums_fn(model: GPTNeoX, num_tasks: int, loss_positions: int = 0) -> Callable:
    """Loss sums of a (micro-)batch; with `loss_positions` k > 0, from logits at the k loss slots
    of each row only (`loss_slots`: every one, as the pipeline packs at most k per row)."""
    def micro_sums(params: Any, batch: Batch) -> tuple[jax.Array, dict]:
        targets, loss_mask, task_ids = batch["targets"], batch["loss_mask"], batch["task_ids"]
        slots = None
        if loss_positions:
            slots = loss_slots(loss_mask, loss_positions)
            targets, loss_mask, task_ids = (jnp.take_along_axis(x, slots, axis=1)
                                            for x in (targets, loss_mask, task_ids))
        logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                             batch["segment_ids"], logits_at=slots)
        sums = loss_sums(logits, targets, loss_mask, task_ids, num_tasks)
        return sums["loss_sum"], sums
    return micro_sums


def _split_micro(batch: Batch, steps: int) -> Batch:
    """[B, T] -> [steps, B/steps, T], micro-batch k = rows k, k+steps, ... so that every device
    keeps contributing rows to every micro-batch."""
    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // steps, steps, *x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(split, batch)


@functools.lru_cache(maxsize=16)
def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, num_tasks: int,
                    rules: Rules = LOGICAL_AXIS_RULES) -> Callable[[TrainState, Batch],
                                                                    tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`; the state argument is donated.

    Cached on its (hashable) arguments, so a resumed stage or a second stage with the same shapes
    reuses the compiled step."""
    model = GPTNeoX(model_cfg)
    tx = make_optimizer(train_cfg)
    schedule = learning_rate_schedule(train_cfg)
    grad_fn = jax.grad(_micro_sums_fn(model, num_tasks, train_cfg.logit_slots), has_aux=True)
    accum = train_cfg.grad_accum_steps

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        with nn.logical_axis_rules(rules):
            if accum == 1:
                grads, sums = grad_fn(state.params, batch)
            else:
                def body(carry, micro):
                    g, s = grad_fn(state.params, micro)
                    return jax.tree_util.tree_map(jnp.add, carry, (g, s)), None
                zeros = jax.tree_util.tree_map(
                    jnp.zeros_like, jax.eval_shape(grad_fn, state.params,
                                                   jax.tree_util.tree_map(lambda x: x[0],
                                                                          _split_micro(batch, accum))))
                (grads, sums), _ = jax.lax.scan(body, zeros, _split_micro(batch, accum))
        scale = 1.0 / jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads)
        metrics = summarize(sums)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32))
        # The optimizer's own count skips skipped steps; report the rate it actually used.
        metrics.update(grad_norm=grad_norm,
                       learning_rate=schedule(state.step - state.skipped_steps),
                       skipped=(~ok).astype(jnp.int32))
        return new_state, metrics

    shardings = state_shardings(model_cfg, train_cfg, mesh, rules)
    jitted = jax.jit(step, in_shardings=(shardings, batch_shardings(mesh)),
                     out_shardings=(shardings, None), donate_argnums=0)

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted  # for .lower() in memory planning and benchmarks
    return run


@functools.lru_cache(maxsize=16)
def make_eval_step(model_cfg: ModelConfig, mesh: Mesh, num_tasks: int,
                   rules: Rules = LOGICAL_AXIS_RULES) -> Callable[[Any, Batch], dict]:
    """`eval_step(params, batch) -> loss sums` (add them over batches, then `summarize`)."""
    model = GPTNeoX(model_cfg)
    micro_sums = _micro_sums_fn(model, num_tasks)

    def evaluate(params: Any, batch: Batch) -> dict:
        with nn.logical_axis_rules(rules):
            return micro_sums(params, batch)[1]

    jitted = jax.jit(evaluate, in_shardings=(None, batch_shardings(mesh)))

    def run(params: Any, batch: Batch) -> dict:
        with jax.set_mesh(mesh):
            return jitted(params, batch)
    return run
