"""Per-topology presets: mesh, batch, model, learning rate, remat and dtype for one machine shape,
with the per-device memory that `launch/plan_memory.py` planned for it (see README.md here).

Pure Python (no JAX import), so launch scripts can read a preset before JAX starts.

Slice names: TPU v4 and v5p names count TensorCores, two per chip, and JAX sees one device per
chip (megacore): v4-32 = 16 chips, v5p-64 = 32 chips. TPU v5e names count chips (one TensorCore
each): v5e-16 = 16 chips.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class TopologyPreset:
    name: str
    description: str
    chip: str  # llmcxr_jax.train.flops table key, or "cpu"
    devices: int  # JAX devices (chips / GPUs / simulated CPU devices)
    mesh: str  # --mesh flag
    model: str  # model preset
    global_batch: int = 16  # the paper's
    seq_len: int = 1024
    learning_rate: float = 5e-6  # the paper's
    warmup_steps: int = 50  # the paper's
    remat_policy: str = "none"
    dtype: str = "bfloat16"  # compute; master weights and Adam moments stay fp32
    grad_accum_steps: int = 1
    param_sharding: str = "data+fsdp"  # llmcxr_jax.parallel.rules.rules_for: ZeRO-3 over data x fsdp
    # From `python launch/plan_memory.py --topology NAME` (GiB per device; CPU-compiled estimate).
    planned_argument_gib: float | None = None
    planned_temp_gib: float | None = None

    def plan_settings(self) -> dict[str, Any]:
        """The settings `launch/plan_memory.py` takes from a preset."""
        return dict(model=self.model, mesh=self.mesh, global_batch=self.global_batch,
                    seq_len=self.seq_len, remat_policy=self.remat_policy, dtype=self.dtype,
                    grad_accum_steps=self.grad_accum_steps, chip=self.chip,
                    param_sharding=self.param_sharding)

    def overrides(self) -> dict[str, Any]:
        """`section.field` overrides for the train config (`--set key=value`)."""
        return {
            "model.remat_policy": self.remat_policy,
            "model.dtype": self.dtype,
            "train.global_batch": self.global_batch,
            "train.seq_len": self.seq_len,
            "train.learning_rate": self.learning_rate,
            "train.warmup_steps": self.warmup_steps,
            "train.grad_accum_steps": self.grad_accum_steps,
            "param_sharding": self.param_sharding,
        }


PRESETS: dict[str, TopologyPreset] = {p.name: p for p in (
    TopologyPreset(
        name="v4-32", description="TPU v4-32 slice: 16 chips (32 GiB HBM each), 4 hosts",
        chip="tpu-v4", devices=16, mesh="4x4", model="dolly-v2-3b", remat_policy="dots",
        planned_argument_gib=1.948, planned_temp_gib=9.816),
    TopologyPreset(
        name="v5e-16", description="TPU v5e-16 slice: 16 chips (16 GiB HBM each), 4 hosts",
        chip="tpu-v5e", devices=16, mesh="4x4", model="dolly-v2-3b",
        remat_policy="dots_with_no_batch_dims",
        planned_argument_gib=1.948, planned_temp_gib=5.503),
    TopologyPreset(
        name="v5p-64", description="TPU v5p-64 slice: 32 chips (95 GiB HBM each), 8 hosts; "
        "FSDP 16 x tensor 2 keeps the paper's global batch of 16 (data x fsdp must divide it)",
        chip="tpu-v5p", devices=32, mesh="data:1,fsdp:16,tensor:2", model="dolly-v2-3b",
        planned_argument_gib=0.974, planned_temp_gib=10.833),
    TopologyPreset(
        name="h100x8", description="one host with 8 NVIDIA H100 SXM (80 GB each): FSDP over 8",
        chip="h100", devices=8, mesh="1x8", model="dolly-v2-3b",
        planned_argument_gib=3.89, planned_temp_gib=37.9),
    TopologyPreset(
        name="cpu-16", description="16 simulated CPU devices "
        "(XLA_FLAGS=--xla_force_host_platform_device_count=16): the tiny model, fp32 compute",
        chip="cpu", devices=16, mesh="4x4", model="tiny", learning_rate=1e-3, warmup_steps=10,
        dtype="float32", planned_argument_gib=0.00087, planned_temp_gib=0.146),
)}


def preset(name: str) -> TopologyPreset:
    """The named topology preset; an unknown name raises naming the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown topology preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def _gib(n_bytes: float) -> str:
    gib = n_bytes / 2**30
    return f"{gib:.2f}" if gib >= 0.1 else f"{n_bytes / 2**20:.1f} MiB"


def markdown_table(rows: Iterable[tuple[TopologyPreset, Mapping[str, Any]]]) -> str:
    """README table from (preset, plan_memory JSON) pairs."""
    out = ["| preset | devices | mesh | model | batch x seq | remat | dtype | args GiB/dev "
           "| temps GiB/dev | total GiB/dev | HBM GiB/dev |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, plan in rows:
        hbm = plan.get("hbm_bytes")
        total = plan["argument_bytes"] + plan["temp_bytes"]
        out.append(
            f"| {p.name} | {p.devices} | `{p.mesh}` | {p.model} | {p.global_batch} x {p.seq_len} "
            f"| {p.remat_policy} | {p.dtype} | {_gib(plan['argument_bytes'])} "
            f"| {_gib(plan['temp_bytes'])} | {_gib(total)} "
            f"| {'-' if hbm is None else f'{hbm / 2**30:.1f}'} |")
    return "\n".join(out)
