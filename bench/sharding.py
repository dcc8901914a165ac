"""What one sharded train step communicates, against the ideal for its layout; compile only.

For each mesh layout the run preset's real train step (`train.step.make_train_step`, its rules
and shardings) is compiled for simulated CPU devices from abstract inputs
(`jax.ShapeDtypeStruct`s; nothing is executed or allocated), one layout per subprocess (its own
device count, its own XLA stderr). From the compiled program:

- collectives by kind and count per step, and the bytes each device sends
  (`parallel.collectives`: read from the HLO text, each loop body counted per iteration, as TPU
  and GPU run it: all-reduce + slice = reduce-scatter, bf16 at 2 bytes);
- FLOPs and HBM bytes per device from XLA's cost analysis. XLA counts a while loop's body once,
  so these come from the same step with 1 and 2 unrolled layers, extrapolated linearly to all
  layers (XLA:CPU fuses differently from TPU: HBM bytes are an estimate);
- XLA's "Involuntary full rematerialization" warnings (a resharding it could only do by
  replicating a whole tensor), counted from the subprocess's stderr.

The ideal bytes per device for the layout's parameter shardings (ring algorithms, group n,
(n-1)/n of the bytes): ZeRO-3 / FSDP - every weight sharded over the batch axes is all-gathered
for the forward and again for the backward, in the compute dtype, and its gradient reduce-scattered
once; the input embedding moves its activations instead (one all-to-all each way); weights
replicated along a batch axis all-reduce their (sharded) gradient there. Tensor parallel - the
per-layer activation all-reduces (Megatron's: forward, the block's output, once with GPT-NeoX's
parallel residual when both branches are summed first, twice without; backward, the input
gradients of the qkv and h_to_4h projections; a remat recompute needs none), plus one each for
the embedding lookup and the LM head's input gradient.

The roofline projection (labelled so: nothing ran on these chips) takes the per-device FLOPs, HBM
bytes and bytes sent and divides by the chip's published peak bf16 FLOP/s, HBM bandwidth and
interconnect bandwidth (`CHIPS`, sources there): step time = the largest of the three (perfect
overlap), MFU = model FLOPs (`train.flops`: 6 N + 12 L T H per token, remat not counted) /
(step time x peak). A 16-device layout projects onto v5e-16 and v4-32 (16 chips each), an
8-device one onto 8xH100.

    python bench/sharding.py --config dolly-v2-3b --mesh 4x4
    python bench/sharding.py --config dolly-v2-3b      # 4x4, 2x8, 16x1, 2x4x2 and 1x8

Prints a table, then one JSON object as the last line: `comm_bytes_ratio_vs_ideal` (the worst
layout), `collectives_per_step` and `collectives_per_layer` per layout,
`involuntary_remat_warnings` (summed over layouts), and every measured and projected number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]

DEFAULT_LAYOUTS = ("4x4", "2x8", "16x1", "2x4x2", "1x8")
REMAT_WARNING = "Involuntary full rematerialization"

# Published per-chip figures (bf16 dense peak FLOP/s, HBM bytes/s, interconnect bytes/s one chip
# can send: half the bidirectional figure).
# - TPU v5e: cloud.google.com/tpu/docs/v5e - 197 TFLOP/s bf16, HBM 819 GB/s, ICI 400 GB/s
#   bidirectional per chip.
# - TPU v4: cloud.google.com/tpu/docs/v4 - 275 TFLOP/s bf16, HBM 1,200 GB/s; ICI: 6 links per chip
#   at 45 GB/s each way (jax-ml.github.io/scaling-book/tpus, the v4p row), 270 GB/s.
#   v4-32 is 16 chips (32 TensorCores, two per chip, one JAX device per chip).
# - H100 SXM: NVIDIA H100 datasheet - 989 TFLOP/s dense bf16, HBM3 3.35 TB/s, NVLink 900 GB/s
#   bidirectional per GPU.
CHIPS: dict[str, dict[str, float]] = {
    "v5e-16": {"devices": 16, "peak_flops": 197e12, "hbm_bw": 819e9, "link_bw": 200e9},
    "v4-32": {"devices": 16, "peak_flops": 275e12, "hbm_bw": 1200e9, "link_bw": 270e9},
    "8xH100": {"devices": 8, "peak_flops": 989e12, "hbm_bw": 3.35e12, "link_bw": 450e9},
}


def mesh_devices(text: str) -> int:
    """Devices a layout flag names (4x4 -> 16, data:2,fsdp:4 -> 8); every axis explicit."""
    parts = [p.split(":")[-1] for p in text.split(",")] if ":" in text else text.split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--mesh={text}: sizes must be integers") from None
    if any(s < 1 for s in sizes):
        raise ValueError(f"--mesh={text}: give every axis size explicitly (no -1)")
    return math.prod(sizes)


# ------------------------------------------------------------------------------------------------
# The worker: one layout, in a process whose XLA_FLAGS asked for its device count.
# ------------------------------------------------------------------------------------------------


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def ideal_bytes(model_cfg, train_cfg, mesh, rules) -> dict[str, float]:
    """Bytes one device sends in an ideal step of this layout (module docstring), by kind."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llmcxr_jax.parallel.shardings import abstract_params, logical_param_specs, param_shardings

    sizes = dict(mesh.shape)
    batch_ways = sizes["data"] * sizes["fsdp"]
    compute = jnp.dtype(model_cfg.dtype).itemsize
    master = jnp.dtype(model_cfg.param_dtype).itemsize
    tokens = train_cfg.global_batch * train_cfg.seq_len // batch_ways  # per device
    hidden = model_cfg.hidden_size
    out = {"all-gather": 0.0, "reduce-scatter": 0.0, "all-reduce": 0.0, "all-to-all": 0.0}

    def share(n: int) -> float:
        return (n - 1) / n

    params = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_params(model_cfg)))
    specs = jax.tree.leaves(logical_param_specs(model_cfg),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shards = jax.tree.leaves(param_shardings(model_cfg, mesh, rules))
    for (path, array), logical, sharding in zip(params, specs, shards):
        axes = [a for entry in sharding.spec if entry is not None
                for a in (entry if isinstance(entry, tuple) else (entry,))]
        gathered = math.prod(sizes[a] for a in axes if a in ("data", "fsdp"))
        tensor = math.prod(sizes[a] for a in axes if a == "tensor")
        matrix = sum(name not in (None, "layers") for name in logical) >= 2
        nbytes = array.size / tensor * (compute if matrix else master)
        name = jax.tree_util.keystr(path)
        if "embed_in" in name:  # the lookup moves activations, not the table
            if gathered > 1:
                out["all-to-all"] += 2 * tokens * hidden * compute * share(gathered)
            gathered_rest = batch_ways // gathered
            if gathered_rest > 1:
                out["all-reduce"] += 2 * nbytes / gathered * share(gathered_rest)
            continue
        if gathered > 1:
            out["all-gather"] += 2 * nbytes * share(gathered)
            out["reduce-scatter"] += nbytes * share(gathered)
        replicas = batch_ways // gathered
        if replicas > 1:
            out["all-reduce"] += 2 * nbytes / gathered * share(replicas)
    t = sizes["tensor"]
    if t > 1:
        # Forward: the block's output (both branches summed first under the parallel residual);
        # backward: the input gradient of each column-split projection (qkv, h_to_4h). A remat
        # recompute needs none: the block's output is not needed for its gradients.
        per_layer = (1 if model_cfg.use_parallel_residual else 2) + 2
        n_allreduce = model_cfg.num_layers * per_layer + 2
        out["all-reduce"] += n_allreduce * 2 * tokens * hidden * compute * share(t)
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from llmcxr_jax.parallel import collectives as coll
    from llmcxr_jax.parallel.mesh import check_global_batch, mesh_from_flag
    from llmcxr_jax.parallel.rules import rules_for
    from llmcxr_jax.train import flops as flops_lib
    from llmcxr_jax.train import run_config as rc
    from llmcxr_jax.train.memory_plan import compile_train_step

    cfg = rc.run_preset(args.config)
    model_cfg = cfg.model
    if args.layers:
        model_cfg = dataclasses.replace(model_cfg, num_layers=args.layers)
    train_cfg = rc.stage_train(cfg, 1)
    mesh = mesh_from_flag(args.mesh)
    check_global_batch(train_cfg.global_batch, mesh)
    rules = rules_for(cfg.param_sharding)

    start = time.perf_counter()
    compiled = compile_train_step(model_cfg, train_cfg, mesh, rules)
    compile_s = time.perf_counter() - start
    if args.hlo_dir:
        path = pathlib.Path(args.hlo_dir) / f"{args.config}_{args.mesh}.hlo.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(compiled.as_text())
    found = coll.collectives(compiled.as_text(), mesh.size)
    summary = coll.summarize(found)
    in_loop = sum(c.executions for c in found if c.executions == model_cfg.num_layers > 1)
    memory = compiled.memory_analysis()

    # FLOPs and HBM bytes: 1 and 2 unrolled layers, extrapolated to all of them.
    costs = []
    for layers in (1, 2):
        small = dataclasses.replace(model_cfg, num_layers=layers, scan_layers=False)
        costs.append(_cost(compile_train_step(small, train_cfg, mesh, rules)))
    extra = model_cfg.num_layers - 1
    flops = costs[0][0] + extra * (costs[1][0] - costs[0][0])
    hbm = costs[0][1] + extra * (costs[1][1] - costs[0][1])

    ideal = ideal_bytes(model_cfg, train_cfg, mesh, rules)
    tokens = train_cfg.global_batch * train_cfg.seq_len
    model_flops = flops_lib.train_flops_per_token(model_cfg, train_cfg.seq_len) * tokens / mesh.size
    return {
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": int(mesh.size),
        "param_sharding": cfg.param_sharding, "dtype": model_cfg.dtype,
        "remat": model_cfg.remat_policy, "layers": model_cfg.num_layers,
        "global_batch": train_cfg.global_batch, "seq_len": train_cfg.seq_len,
        "compile_s": compile_s,
        "collectives": summary.counts, "collectives_per_step": summary.total_count,
        "collectives_per_layer": in_loop / model_cfg.num_layers,
        "bytes_sent": summary.bytes_sent, "bytes_sent_total": summary.total_bytes,
        "ideal_bytes": ideal, "ideal_bytes_total": sum(ideal.values()),
        "comm_bytes_ratio_vs_ideal": summary.total_bytes / max(sum(ideal.values()), 1.0),
        "xla_flops": flops, "xla_hbm_bytes": hbm, "model_flops": model_flops,
        "argument_bytes": int(memory.argument_size_in_bytes) if memory else None,
        "temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
    }


# ------------------------------------------------------------------------------------------------
# The driver: one subprocess per layout, then the table, the projection and the JSON line.
# ------------------------------------------------------------------------------------------------


def run_layout(config: str, mesh: str, layers: int, hlo_dir: str) -> dict[str, Any]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                         f"{mesh_devices(mesh)}"])
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--mesh", mesh,
           "--layers", str(layers)] + (["--hlo-dir", hlo_dir] if hlo_dir else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"--mesh={mesh}: the compile failed: {tail[0]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["involuntary_remat_warnings"] = proc.stderr.count(REMAT_WARNING)
    result["layout"] = mesh
    return result


def project(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Roofline step time and MFU on every chip with the layout's device count."""
    out = {}
    for chip, spec in CHIPS.items():
        if spec["devices"] != result["devices"]:
            continue
        compute = result["xla_flops"] / spec["peak_flops"]
        memory = result["xla_hbm_bytes"] / spec["hbm_bw"]
        comm = result["bytes_sent_total"] / spec["link_bw"]
        step = max(compute, memory, comm)
        out[chip] = {"step_s": step, "compute_s": compute, "hbm_s": memory, "comm_s": comm,
                     "bound": ("compute", "hbm", "comm")[[compute, memory, comm].index(step)],
                     "mfu": result["model_flops"] / (step * spec["peak_flops"]),
                     "mfu_without_hbm": result["model_flops"] / (max(compute, comm) *
                                                                 spec["peak_flops"])}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="dolly-v2-3b",
                   help="run preset (llmcxr_jax.train.run_config.RUN_PRESETS): its model, batch, "
                        "sequence length, remat and param_sharding")
    p.add_argument("--mesh", action="append",
                   help=f"a layout (repeatable; default {', '.join(DEFAULT_LAYOUTS)})")
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count")
    p.add_argument("--hlo-dir", default="", help="also write each layout's compiled HLO here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from llmcxr_jax.train import run_config as rc

    try:
        rc.run_preset(args.config)
    except KeyError as e:
        p.error(f"--config: {e.args[0]}")
    if args.worker:
        print(json.dumps(worker(argparse.Namespace(config=args.config, mesh=args.mesh[0],
                                                   layers=args.layers, hlo_dir=args.hlo_dir))))
        return 0
    layouts = args.mesh or list(DEFAULT_LAYOUTS)
    for mesh in layouts:
        try:
            mesh_devices(mesh)
        except ValueError as e:
            p.error(str(e))
    results = []
    for mesh in layouts:
        print(f"compiling {args.config} on {mesh} ...", file=sys.stderr, flush=True)
        results.append(run_layout(args.config, mesh, args.layers, args.hlo_dir))

    gib = 2**30
    print(f"\n{args.config}: one train step per device, compiled for simulated CPU devices "
          f"(batch {results[0]['global_batch']} x {results[0]['seq_len']}, "
          f"{results[0]['dtype']}, remat {results[0]['remat']}, state over "
          f"{results[0]['param_sharding']})")
    print("| layout | collectives/step (AG / RS / AR / A2A) | per layer | sent GiB | ideal GiB "
          "| ratio | XLA TFLOP | HBM GiB | remat warnings |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c = r["collectives"]
        print(f"| {r['layout']} | {r['collectives_per_step']} ({c['all-gather']} / "
              f"{c['reduce-scatter']} / {c['all-reduce']} / {c['all-to-all']}) | "
              f"{r['collectives_per_layer']:g} | {r['bytes_sent_total'] / gib:.3f} | "
              f"{r['ideal_bytes_total'] / gib:.3f} | {r['comm_bytes_ratio_vs_ideal']:.3f} | "
              f"{r['xla_flops'] / 1e12:.2f} | {r['xla_hbm_bytes'] / gib:.1f} | "
              f"{r['involuntary_remat_warnings']} |")
    print("\nRoofline PROJECTION from published peaks (nothing ran on these chips): step time = "
          "max(FLOPs / peak, HBM bytes / HBM bandwidth, bytes sent / interconnect bandwidth)")
    print("(HBM bytes are XLA:CPU's, which fuses less than TPU and runs bf16 as f32: the HBM "
          "term is pessimistic; the last column leaves it out)")
    print("| chip | layout | compute s | HBM s | comm s | step s (bound) | projected MFU | "
          "MFU without HBM |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        r["projection"] = project(r)
        for chip, pr in r["projection"].items():
            print(f"| {chip} | {r['layout']} | {pr['compute_s']:.3f} | {pr['hbm_s']:.3f} | "
                  f"{pr['comm_s']:.3f} | {pr['step_s']:.3f} ({pr['bound']}) | "
                  f"{100 * pr['mfu']:.1f} % | {100 * pr['mfu_without_hbm']:.1f} % |")
    summary = {
        "config": args.config,
        "comm_bytes_ratio_vs_ideal": max(r["comm_bytes_ratio_vs_ideal"] for r in results),
        "collectives_per_step": {r["layout"]: r["collectives_per_step"] for r in results},
        "collectives_per_layer": {r["layout"]: r["collectives_per_layer"] for r in results},
        "involuntary_remat_warnings": sum(r["involuntary_remat_warnings"] for r in results),
        "projected_mfu": {f"{chip}@{r['layout']}": pr["mfu"] for r in results
                          for chip, pr in r["projection"].items()},
        "layouts": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
