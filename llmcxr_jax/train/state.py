"""The train state pytree and its shardings, initialised straight into place.

Shapes come from `jax.eval_shape`, shardings from the logical axis names on the params through the
one rules table, and `jax.jit(..., out_shardings=...)` initialises each shard on its own device:
the full model never exists on one host.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmcxr_jax.configs import ModelConfig, TrainConfig
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.parallel.shardings import Rules, abstract_params, param_shardings
from llmcxr_jax.train.optimizer import make_optimizer

__all__ = ["Rules", "TrainState", "abstract_params", "param_shardings", "state_shardings",
           "init_state", "state_from_params"]  # the first three re-exported for the train loop


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any
    skipped_steps: jax.Array  # int32 []: steps whose loss or gradients were not finite


def state_shardings(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES) -> TrainState:
    """Shardings of every TrainState leaf: Adam moments follow their params, scalars replicate."""
    p_shard = param_shardings(model_cfg, mesh, rules)
    tx = make_optimizer(train_cfg)
    abstract = abstract_params(model_cfg)
    opt_abstract = jax.eval_shape(tx.init, abstract)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shard = optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, p_shard,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=p_shard, opt_state=opt_shard,
                      skipped_steps=replicated)


def _new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped_steps=jnp.zeros((), jnp.int32))


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
               rules: Rules = LOGICAL_AXIS_RULES) -> TrainState:
    """A fresh, randomly initialised state, each shard created on its device."""
    tx = make_optimizer(train_cfg)
    model = GPTNeoX(model_cfg)
    shardings = state_shardings(model_cfg, train_cfg, mesh, rules)

    def init(seed: jax.Array) -> TrainState:
        # The first of two keys, as before the state lost its unused key: a seed's params stay.
        init_key = jax.random.split(jax.random.key(seed))[0]
        params = nn.unbox(model.init(init_key, jnp.zeros((1, 8), jnp.int32))["params"])
        return _new_state(params, tx)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)(jnp.asarray(train_cfg.seed, jnp.uint32))


def state_from_params(params: Any, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
                      rules: Rules = LOGICAL_AXIS_RULES) -> TrainState:
    """A state with a fresh optimizer around given (already sharded) params, e.g. stage 2's start
    from stage 1, or imported HF weights. The params are donated."""
    tx = make_optimizer(train_cfg)
    shardings = state_shardings(model_cfg, train_cfg, mesh, rules)

    with jax.set_mesh(mesh):
        return jax.jit(lambda p: _new_state(p, tx), out_shardings=shardings,
                       donate_argnums=0)(params)
