"""Per-device memory of the real train step, from shapes alone.

The train state is built as `ShapeDtypeStruct`s carrying their shardings (nothing allocated), the
real jitted step is lowered and compiled for the mesh, and XLA's `memory_analysis()` reports the
bytes one device holds: arguments (its shards of params, Adam moments and the batch) and
temporaries (activations, gradients, gathered FSDP weights). On simulated CPU devices this plans a
TPU/GPU run without the hardware; XLA's CPU backend schedules and fuses differently from TPU, so
treat temporaries as an estimate (arguments are exact).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llmcxr_jax.configs import ModelConfig, TrainConfig
from llmcxr_jax.data.pipeline import BATCH_KEYS
from llmcxr_jax.parallel.mesh import check_global_batch
from llmcxr_jax.parallel.rules import rules_for
from llmcxr_jax.train.checkpoint import abstract_train_state
from llmcxr_jax.train.flops import total_params
from llmcxr_jax.train.step import batch_shardings, make_train_step

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    devices: int
    params: int
    argument_bytes: int  # per device
    temp_bytes: int  # per device
    output_bytes: int  # per device (aliases the donated state)
    alias_bytes: int
    generated_code_bytes: int
    analytic_state_bytes: int  # (params + 2 Adam moments) * param bytes / devices
    hbm_bytes: int | None
    param_sharding: str = "data+fsdp"

    @property
    def total_bytes(self) -> int:
        """What one device needs at peak: arguments + temporaries (outputs alias the state)."""
        return self.argument_bytes + self.temp_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


def abstract_batch(train_cfg: TrainConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch the step takes, as sharded shapes."""
    shape = (train_cfg.global_batch, train_cfg.seq_len)
    shardings = batch_shardings(mesh)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=shardings[k]) for k in BATCH_KEYS}


def compile_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, rules: Any,
                       num_tasks: int = 4) -> jax.stages.Compiled:
    """The real train step compiled for `mesh` from sharded shapes; nothing is allocated."""
    state = abstract_train_state(model_cfg, train_cfg, mesh, rules)
    step = make_train_step(model_cfg, train_cfg, mesh, num_tasks, rules)
    with jax.set_mesh(mesh):
        return step.jitted.lower(state, abstract_batch(train_cfg, mesh)).compile()


def analytic_state_bytes(model_cfg: ModelConfig, devices: int) -> int:
    """(params + Adam's two moments) in the master dtype, split evenly over the devices."""
    return 3 * total_params(model_cfg) * jnp.dtype(model_cfg.param_dtype).itemsize // devices


def plan_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
                    num_tasks: int = 4, hbm_bytes: int | None = None,
                    param_sharding: str = "data+fsdp") -> MemoryPlan:
    """Compile the train step for `mesh` from shapes and read its per-device memory.

    `param_sharding` picks the rules (`parallel.rules.rules_for`): "data+fsdp" splits the state
    over every batch-parallel device (ZeRO-3), "fsdp" keeps replicas along `data`.
    """
    check_global_batch(train_cfg.global_batch, mesh)
    compiled = compile_train_step(model_cfg, train_cfg, mesh, rules_for(param_sharding), num_tasks)
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError(f"XLA gave no memory analysis on {jax.devices()[0].platform}")
    return MemoryPlan(
        devices=mesh.size,
        params=total_params(model_cfg),
        argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        analytic_state_bytes=analytic_state_bytes(model_cfg, mesh.size),
        hbm_bytes=hbm_bytes,
        param_sharding=param_sharding,
    )


def describe(plan: MemoryPlan) -> str:
    """A few human lines: per-device arguments and temporaries against the chip's HBM."""
    lines = [
        f"devices {plan.devices}, params {plan.params / 1e9:.3f} B",
        f"per device: arguments {plan.argument_bytes / GIB:.3f} GiB "
        f"(analytic params + Adam moments {plan.analytic_state_bytes / GIB:.3f} GiB, "
        f"ratio {plan.argument_bytes / max(plan.analytic_state_bytes, 1):.4f})",
        f"            temporaries {plan.temp_bytes / GIB:.3f} GiB, "
        f"total {plan.total_bytes / GIB:.3f} GiB",
    ]
    if plan.hbm_bytes is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"            HBM {plan.hbm_bytes / GIB:.2f} GiB: {verdict} "
                     f"({100 * plan.total_bytes / plan.hbm_bytes:.0f}% used)")
    return "\n".join(lines)
