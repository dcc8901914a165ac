"""Memory planning: compiling the real train step from shapes gives per-device argument bytes that
match the analytic (params + Adam moments) / devices, for both ways of splitting the state."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from llmcxr_jax.configs import TrainConfig, model_preset
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.parallel.rules import rules_for
from llmcxr_jax.train import flops, memory_plan
from tpu_configs import PRESETS, markdown_table, preset

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny preset shortened to one layer with a smaller vocabulary keeps the compile fast; the
# embeddings still dominate the state, so replicated biases cannot hide inside the 2 %.
MODEL = model_preset("tiny", num_layers=1, vocab_size=1024, max_position_embeddings=64)
TRAIN = TrainConfig(global_batch=8, seq_len=64)


def shard_bytes(abstract_tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(abstract_tree))


def test_plan_matches_the_analytic_state_size_zero3():
    mesh = mesh_from_flag("2x4")
    plan = memory_plan.plan_train_step(MODEL, TRAIN, mesh, hbm_bytes=flops.HBM_BYTES["tpu-v5e"])
    state = memory_plan.abstract_train_state(MODEL, TRAIN, mesh, rules_for("data+fsdp"))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    assert plan.params == params == flops.total_params(MODEL)
    analytic = 3 * params * 4 / 8  # fp32 params + two fp32 Adam moments over 8 devices
    assert plan.analytic_state_bytes == int(analytic)
    # XLA's argument bytes are exactly this device's shards of the state and the batch ...
    batch = memory_plan.abstract_batch(TRAIN, mesh)
    assert plan.argument_bytes == shard_bytes(state) + shard_bytes(batch)
    # ... and the state part is within 2 % of an even split of everything but the 1-D params
    # (LayerNorms, biases), which are replicated (small multi-dim biases and scalars remain).
    vectors = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(state.params)
                  if x.ndim - ("layers" in jax.tree_util.keystr(path)) == 1)
    expected = 3 * 4 * ((params - vectors) / 8 + vectors)
    assert abs(shard_bytes(state) / expected - 1) < 0.02, (shard_bytes(state), expected)
    assert plan.temp_bytes > 0 and plan.fits
    assert plan.output_bytes == pytest.approx(shard_bytes(state), rel=0.01)  # the new state


def test_fsdp_only_keeps_replicas_along_data():
    mesh = mesh_from_flag("2x4")
    zero3 = memory_plan.abstract_train_state(MODEL, TRAIN, mesh, rules_for("data+fsdp"))
    fsdp = memory_plan.abstract_train_state(MODEL, TRAIN, mesh, rules_for("fsdp"))
    # Split 4 ways (fsdp) instead of 8: twice the per-device state of the ZeRO-3 layout.
    assert abs(shard_bytes(fsdp) / (2 * shard_bytes(zero3)) - 1) < 0.02
    emb = fsdp.params["embed_in"]["embedding"].sharding.spec
    assert emb == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert zero3.params["embed_in"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(
        "tensor", ("data", "fsdp"))
    with pytest.raises(ValueError, match="param_sharding 'zero'"):
        rules_for("zero")


def test_launch_script_rejects_bad_flags_and_presets_are_consistent():
    out = subprocess.run([sys.executable, "launch/plan_memory.py", "--mesh", "4x-1"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "--mesh=4x-1" in out.stderr
    with pytest.raises(KeyError, match="unknown topology preset 'v9-8'"):
        preset("v9-8")
    for p in PRESETS.values():
        sizes = [int(s.split(":")[-1]) for s in p.mesh.replace(",", "x").split("x")]
        ways = 1
        for s in sizes[:2]:
            ways *= s
        prod = 1
        for s in sizes:
            prod *= s
        assert prod == p.devices, p.name
        assert p.global_batch % ways == 0, p.name  # batch splits over data x fsdp
        if p.chip != "cpu":
            assert p.chip in flops.HBM_BYTES
        assert p.planned_argument_gib is not None and p.planned_temp_gib is not None, p.name
        if p.chip != "cpu":
            assert p.planned_argument_gib + p.planned_temp_gib < flops.HBM_BYTES[p.chip] / 2**30
    table = markdown_table([(preset("v5e-16"), {"argument_bytes": 2**31, "temp_bytes": 2**30,
                                                "hbm_bytes": 16 * 2**30})])
    assert "| v5e-16 | 16 | `4x4` | dolly-v2-3b | 16 x 1024 |" in table and "| 2.00 | 1.00 | 3.00 | 16.0 |" in table
