"""Export a trained or imported model to another checkpoint format.

    python launch/export.py --workdir W --format hf --out DIR [--max-shard-size 2GB]
                            [--param-dtype float32|bfloat16|float16] [--step N] [--mesh -1]
    python launch/export.py --workdir W --format serving --out DIR [--param-dtype bfloat16]
                            [--vqgan DIR] [--step N] [--mesh -1]

W is a training run's workdir (its final LLM in W/llm, VQ-GAN in W/vqgan_run/vqgan), an LLM
workdir (`launch/import_hf.py`) or a serving folder. The params are restored into shardings on
`--mesh`, never gathered whole on one device; DIR is written as DIR.tmp and renamed when complete.

`--format hf`: a transformers `GPTNeoXForCausalLM` directory (config.json, safetensors shards with
`model.safetensors.index.json`, tokenizer files) that `from_pretrained` loads without warnings;
gathered one tensor at a time, process 0 writes.

`--format serving`: params only (no optimizer state; `--param-dtype bfloat16` halves them) as a sharded
orbax checkpoint that restores onto any mesh, plus the tokenizer and a copy of the VQ-GAN, so that
`launch/generate.py --workdir DIR` runs from that folder alone (`llmcxr_jax.llm.serving`).
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Callable

from llmcxr_jax import cli
from llmcxr_jax.llm import hf_io, serving
from llmcxr_jax.parallel import mesh as mesh_lib

Exporter = Callable[[argparse.Namespace, serving.Bundle], pathlib.Path]


def export_hf(args: argparse.Namespace, bundle: serving.Bundle) -> pathlib.Path:
    return hf_io.export_hf(bundle.params, bundle.model_config, bundle.vocab, args.out,
                           max_shard_size=args.max_shard_size,
                           dtype=args.param_dtype or "float32", overwrite=args.overwrite,
                           progress=mesh_lib.is_main_process() and not args.no_progress)


def export_serving(args: argparse.Namespace, bundle: serving.Bundle) -> pathlib.Path:
    if args.param_dtype not in (None, *serving.PARAM_DTYPES):
        raise cli.UsageError(f"--param-dtype {args.param_dtype}: --format serving takes "
                             f"{serving.PARAM_DTYPES}")
    if bundle.vqgan_dir is None and mesh_lib.is_main_process():
        print(f"note: {args.workdir} holds no VQ-GAN and no --vqgan was given: the serving folder "
              f"will hold the LLM only (text tasks, or image codes as input)")
    return serving.export_bundle(bundle, args.out, param_dtype=args.param_dtype,
                                 overwrite=args.overwrite)


# One entry per output format: name -> (function(args, bundle) -> written path, needs the VQ-GAN).
FORMATS: dict[str, tuple[Exporter, bool]] = {"hf": (export_hf, False),
                                             "serving": (export_serving, True)}


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--workdir", required=True,
                        help="a training-run workdir, LLM workdir or serving folder")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True,
                        help="hf: a transformers folder; serving: params + tokenizer + VQ-GAN")
    parser.add_argument("--out", required=True, help="the folder to write")
    cli.add_step(parser)
    cli.add_mesh(parser, what=" the params are restored onto")
    cli.add_overwrite(parser)
    parser.add_argument("--param-dtype", choices=sorted(hf_io.DTYPES), default=None,
                        help="dtype of the written weights (hf default float32; serving default: "
                             "as trained; serving takes float32 or bfloat16)")
    cli.add_no_progress(parser)
    hf = parser.add_argument_group("--format hf")
    hf.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, "
                                                            "500MB, 1GiB")
    srv = parser.add_argument_group("--format serving")
    cli.add_vqgan(srv, what=" to bundle (default: the workdir's own)")
    cli.add_alias(parser, "--dtype", "--param-dtype")
    args = parser.parse_args(argv)

    exporter, wants_vqgan = FORMATS[args.format]
    if not wants_vqgan and args.vqgan is not None:
        parser.error(f"--vqgan is for --format serving, not --format {args.format}")
    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.mesh_from_flag(args.mesh)
    try:
        bundle = serving.load_bundle(args.workdir, mesh, vqgan=args.vqgan, step=args.step,
                                     load_vqgan=False)
    except serving.BundleError as e:
        raise serving.BundleError(f"--workdir: {e}") from None
    out = exporter(args, bundle)
    if mesh_lib.is_main_process():
        print(f"exported {args.workdir} ({bundle.kind}, step {bundle.step}) as {args.format} "
              f"-> {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
