"""Every `tpu_configs` preset can run before anyone rents its machine: on as many simulated CPU
devices as the preset names, its mesh fills exactly that many, its global batch splits over the
mesh's batch axes (applied to the dolly-v2-3b run preset as `--set` overrides, as a user would),
and the real train step compiles for it: compile only, with the tiny model in the preset's
dtype, remat policy and state split, at the preset's global batch and accumulation (sequences of
at most 256 tokens: the length is not split over the mesh, and shorter compiles faster).
(The presets' own models are planned, not compiled here: `launch/plan_memory.py --all-topologies`.)

One subprocess holds the largest device count and lays each preset's mesh over its first N
devices (the test suite itself runs on 8)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from tpu_configs import PRESETS
from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, sys
import jax
from tpu_configs import PRESETS
from llmcxr_jax.configs import TrainConfig, model_preset
from llmcxr_jax.parallel.mesh import MeshError, check_global_batch, mesh_from_flag
from llmcxr_jax.train import memory_plan
from llmcxr_jax.train import run_config as rc

results = {}
for p in PRESETS.values():
    try:
        mesh = mesh_from_flag(p.mesh, jax.devices()[:p.devices])  # exactly p.devices devices
        sets = [f"{k}={v}" for k, v in p.overrides().items()] + [f"mesh={p.mesh}"]
        cfg = rc.resolve(rc.apply_overrides(rc.run_preset("dolly-v2-3b"), sets))
        check_global_batch(cfg.train.global_batch, mesh, flag="--set train.global_batch")
        model = model_preset("tiny", dtype=p.dtype, remat_policy=p.remat_policy)
        train = TrainConfig(global_batch=p.global_batch, seq_len=min(p.seq_len, 256),
                            grad_accum_steps=p.grad_accum_steps)
        plan = memory_plan.plan_train_step(model, train, mesh, param_sharding=p.param_sharding)
        results[p.name] = {"ok": True, "devices": plan.devices, "mesh": dict(mesh.shape),
                           "temp_bytes": plan.temp_bytes}
    except (MeshError, ValueError, KeyError) as err:
        results[p.name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
print(json.dumps(results))
"""


def test_every_preset_mesh_and_batch_fit_its_devices_and_its_step_compiles():
    n = max(p.devices for p in PRESETS.values())
    env = dict(os.environ, XLA_FLAGS=xla_flags(n),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(PRESETS)
    broken = {name: r["error"] for name, r in results.items() if not r["ok"]}
    assert not broken, f"tpu_configs presets that cannot run: {broken}"
    for name, r in results.items():
        assert r["devices"] == PRESETS[name].devices, (name, r)
        assert r["temp_bytes"] > 0
