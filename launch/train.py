"""Train LLM-CXR: phantom world (or real MIMIC-CXR-JPG) -> VQ-GAN -> codes -> stage 1 -> stage 2.

With no flags it runs the embedded default end to end on the phantom world, in ./workdir/phantom.
Every step reuses what is already complete in the workdir, so rerunning (or resuming after a kill
or a SIGTERM, which saves a checkpoint and exits 0) does not redo finished work; a finished step
asked for other settings than it was made with (its STEP.json) stops the run with one line, except
more steps, which continue it (see llmcxr_jax/train/step_record.py).

Examples:
  python launch/train.py
  XLA_FLAGS=--xla_force_host_platform_device_count=16 python launch/train.py --mesh=4x4 --config tiny
  python launch/train.py --config dolly-v2-3b --mesh=4x4 --set data.world=/data/mimic-cxr-jpg \\
      --set data.codes=/data/codes --set data.instructions=/data/databricks-dolly-15k.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices  # noqa: E402

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

from llmcxr_jax.parallel.mesh import MeshError, maybe_initialize_distributed  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llmcxr_jax.train import run_config as rc

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--set keys and their defaults (phantom preset):\n" + rc.describe_keys())
    parser.add_argument("--config", default="phantom",
                        help=f"run preset: {', '.join(sorted(rc.RUN_PRESETS))} (default phantom)")
    parser.add_argument("--mesh", default=None,
                        help="device mesh: 4x4 (data x fsdp), 2x4x2 (+tensor), "
                             "data:2,fsdp:4,tensor:2, or -1 to fill one axis (default: preset's)")
    parser.add_argument("--stage", default="both", choices=("1", "2", "both"),
                        help="which LLM stage(s) to run; stage 2 starts from stage 1's params")
    parser.add_argument("--workdir", default=None,
                        help="where everything goes (default ./workdir/<config>)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train steps of the selected stage(s) (overrides the preset); a "
                             "finished stage asked for more continues from its last checkpoint")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.learning_rate=1e-4 "
                             "(see the list below)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    maybe_initialize_distributed()
    from llmcxr_jax.train import run_config as rc
    from llmcxr_jax.train.run import SetupError, preflight, run

    stages = (1, 2) if args.stage == "both" else (int(args.stage),)
    workdir = args.workdir or f"workdir/{args.config}"
    try:
        cfg = rc.apply_overrides(rc.run_preset(args.config), args.sets)
        if args.mesh is not None:
            cfg = dataclasses.replace(cfg, mesh=args.mesh)
        if args.steps is not None:
            for k in stages:
                loop = rc.stage_loop(cfg, k)
                cfg = dataclasses.replace(cfg, **{f"stage{k}": dataclasses.replace(
                    loop, steps=args.steps)})
        # Mesh vs batches, the given data, each finished step's record vs what is asked now:
        # checked before anything is written, so a mismatch is a one-line error.
        preflight(cfg, workdir, stages)
    except (MeshError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        return run(cfg, workdir, stages=stages)
    except SetupError as err:  # e.g. a tokenizer that is not the init_from model's own
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
