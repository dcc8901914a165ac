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

from llmcxr_jax import cli
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llmcxr_jax.train import run_config as rc

    parser = cli.parser(__doc__, epilog="--set keys and their defaults (phantom preset):\n"
                                        + rc.describe_keys())
    parser.add_argument("--config", default="phantom", choices=sorted(rc.RUN_PRESETS),
                        help="run preset")
    cli.add_mesh(parser, None, " (default: the preset's)")
    parser.add_argument("--stage", default="both", choices=("1", "2", "both"),
                        help="which LLM stage(s) to run; stage 2 starts from stage 1's params")
    parser.add_argument("--workdir", default=None,
                        help="the run's folder: everything goes there, and a rerun resumes it "
                             "(default ./workdir/<config>)")
    parser.add_argument("--steps", type=cli.positive_int, default=None,
                        help="train steps of the selected stage(s) (default: the preset's); a "
                             "finished stage asked for more continues from its last checkpoint; "
                             "a run without stage 1 (--set stage1.steps=0) keeps none")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.learning_rate=1e-4 "
                             "(see the list below)")
    cli.add_no_progress(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmcxr_jax.parallel.mesh import maybe_initialize_distributed
    from llmcxr_jax.train import run_config as rc
    from llmcxr_jax.train.run import preflight, run

    maybe_initialize_distributed()

    stages = (1, 2) if args.stage == "both" else (int(args.stage),)
    workdir = args.workdir or f"workdir/{args.config}"
    try:
        cfg = rc.apply_overrides(rc.run_preset(args.config), args.sets)
        if args.mesh is not None:
            cfg = dataclasses.replace(cfg, mesh=args.mesh)
        if args.steps is not None:
            for k in stages:
                if k == 1 and rc.skips_stage1(cfg):
                    continue  # stage1.steps=0 stays off: stage 2 starts from the base model
                loop = rc.stage_loop(cfg, k)
                cfg = dataclasses.replace(cfg, **{f"stage{k}": dataclasses.replace(
                    loop, steps=args.steps)})
    except (KeyError, ValueError) as err:  # an unknown --set key, a value of the wrong kind
        raise cli.UsageError(cli.one_line(err)) from None
    # Mesh vs devices and batches, the given data, each finished step's record vs what is asked
    # now: checked before anything is written (MeshError, SetupError, StepConflict: one line).
    preflight(cfg, workdir, stages)
    # SetupError: e.g. a tokenizer that is not init_from's own
    return run(cfg, workdir, stages=stages, progress=not args.no_progress)


if __name__ == "__main__":
    cli.run(main)
