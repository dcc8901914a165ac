"""Plan the per-device memory of the real train step on simulated CPU devices.

    python launch/plan_memory.py --model dolly-v2-3b --mesh 4x4 --batch-size 16 --seq-len 1024 \
        --chip v5e
    python launch/plan_memory.py --model dolly-v2-3b --mesh 4x4 --remat full
    python launch/plan_memory.py --topology v5e-16        # a tpu_configs preset's settings
    python launch/plan_memory.py --all-topologies         # every preset + a Markdown table

Compiles the step from shapes alone (nothing is allocated) and prints per-device argument and
temporary bytes against the chip's HBM; the last line is one JSON object (`argument_bytes`,
`temp_bytes`, `params`, `devices`, `hbm_bytes`, ...).
"""

import json
import math
import os
import sys

from llmcxr_jax import cli
from llmcxr_jax.configs import MODEL_PRESETS
from tpu_configs import PRESETS, preset as get_preset  # no JAX import


def mesh_device_count(text: str) -> int:
    """Devices a `--mesh` flag needs (4x4 -> 16, data:2,fsdp:4 -> 8); -1 is not allowed here."""
    parts = [p.split(":")[-1] for p in text.replace(",", "x").split("x")] if ":" in text \
        else text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise cli.UsageError(f"--mesh={text}: sizes must be integers") from None
    if any(s < 1 for s in sizes):
        raise cli.UsageError(f"--mesh={text}: give every axis size explicitly (no -1) for "
                             "planning")
    return math.prod(sizes)


def simulate_devices(n: int) -> None:
    """Ask XLA for `n` CPU devices; must run before JAX initialises its backends."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--topology", choices=sorted(PRESETS), help="take every setting from this "
                   "tpu_configs preset (flags given too override it; default: v5e-16's)")
    p.add_argument("--all-topologies", action="store_true",
                   help="plan every tpu_configs preset (one process each) and print a Markdown "
                        "table")
    p.add_argument("--model", choices=sorted(MODEL_PRESETS),
                   help="GPT-NeoX preset (default: the topology's)")
    p.add_argument("--mesh", help="device mesh, every axis explicit: 4x4 (data x fsdp), 2x4x2 "
                                  "(+ tensor), data:1,fsdp:16,tensor:2 (default: the topology's)")
    p.add_argument("--batch-size", type=cli.positive_int,
                   help="global batch, all devices together (default: the topology's)")
    p.add_argument("--seq-len", type=cli.positive_int,
                   help="tokens per training sequence (default: the topology's)")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_with_no_batch_dims"),
                   help="remat policy of the scanned layers (default: the topology's)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                   help="the dtype the model computes in (default: the topology's)")
    p.add_argument("--grad-accum", type=cli.positive_int,
                   help="micro-batches per step (default: the topology's)")
    p.add_argument("--chip", help="target chip for the HBM comparison: v4, v5e, v5p, v6e, h100, "
                   "h200, a100, or cpu (default: the topology's)")
    p.add_argument("--param-sharding", choices=("fsdp", "data+fsdp"),
                   help="split the weights and Adam moments over fsdp only (data axis = replicas) "
                   "or over data x fsdp (ZeRO-3) (default: the topology's)")
    p.add_argument("--num-tasks", type=cli.positive_int, default=4,
                   help="task ids the loss tracks separately")
    for old, new in (("--preset", "--topology"), ("--all-presets", "--all-topologies"),
                     ("--config", "--model"), ("--batch", "--batch-size"),
                     ("--seq", "--seq-len"), ("--dtype", "--compute-dtype")):
        cli.add_alias(p, old, new)
    args = p.parse_args(argv)

    if args.all_topologies:
        import subprocess
        rows = []
        for name in PRESETS:
            out = subprocess.run([sys.executable, __file__, "--topology", name], text=True,
                                 capture_output=True)
            if out.returncode:
                print(out.stdout + out.stderr, file=sys.stderr)
                return out.returncode
            print(out.stdout, end="", flush=True)
            rows.append((PRESETS[name], json.loads(out.stdout.strip().splitlines()[-1])))
        from tpu_configs import markdown_table
        print(markdown_table(rows))
        return 0

    # Defaults: the v5e-16 preset (dolly-v2-3b, 4x4, batch 16 x 1024, bf16, its remat policy).
    settings = get_preset(args.topology or "v5e-16").plan_settings()
    for flag, key in (("model", "model"), ("mesh", "mesh"), ("batch_size", "global_batch"),
                      ("seq_len", "seq_len"), ("remat", "remat_policy"),
                      ("compute_dtype", "dtype"),
                      ("grad_accum", "grad_accum_steps"), ("chip", "chip"),
                      ("param_sharding", "param_sharding")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)

    simulate_devices(mesh_device_count(settings["mesh"]))
    import time

    from llmcxr_jax.configs import TrainConfig, model_preset
    from llmcxr_jax.parallel.mesh import mesh_from_flag
    from llmcxr_jax.train import flops, memory_plan

    try:
        model_cfg = model_preset(settings["model"], dtype=settings["dtype"],
                                 remat_policy=settings["remat_policy"])
        chip = "cpu" if settings["chip"] == "cpu" else flops.resolve_chip(settings["chip"])
    except (KeyError, ValueError) as err:  # a chip the HBM table does not know
        raise cli.UsageError(cli.one_line(err)) from None
    train_cfg = TrainConfig(global_batch=settings["global_batch"], seq_len=settings["seq_len"],
                            grad_accum_steps=settings["grad_accum_steps"])
    mesh = mesh_from_flag(settings["mesh"])
    print(f"planning {settings['model']} on mesh {dict(mesh.shape)} ({mesh.size} simulated "
          f"devices), batch {train_cfg.global_batch} x {train_cfg.seq_len}, "
          f"remat {model_cfg.remat_policy}, {model_cfg.dtype} compute, "
          f"accum {train_cfg.grad_accum_steps}, state split over {settings['param_sharding']}, "
          f"chip {chip}", flush=True)
    start = time.perf_counter()
    plan = memory_plan.plan_train_step(model_cfg, train_cfg, mesh, args.num_tasks,
                                       hbm_bytes=flops.HBM_BYTES.get(chip),
                                       param_sharding=settings["param_sharding"])
    print(f"compiled in {time.perf_counter() - start:.1f} s")
    print(memory_plan.describe(plan))
    print(json.dumps({**plan.as_dict(), **settings, "chip": chip}))
    return 0


if __name__ == "__main__":
    cli.run(main)
