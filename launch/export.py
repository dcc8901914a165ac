"""Export a trained or imported model to another checkpoint format.

    python launch/export.py --workdir W --format hf --out DIR [--max-shard-size 2GB]
                            [--dtype float32|bfloat16|float16] [--step N] [--mesh -1]
    python launch/export.py --workdir W --format serving --out DIR [--dtype bfloat16]
                            [--vqgan DIR] [--step N] [--mesh -1]

W is a training run's workdir (its final LLM in W/llm, VQ-GAN in W/vqgan_run/vqgan), an LLM
workdir (`launch/import_hf.py`) or a serving folder. The params are restored into shardings on
`--mesh`, never gathered whole on one device; DIR is written as DIR.tmp and renamed when complete.

`--format hf`: a transformers `GPTNeoXForCausalLM` directory (config.json, safetensors shards with
`model.safetensors.index.json`, tokenizer files) that `from_pretrained` loads without warnings;
gathered one tensor at a time, process 0 writes.

`--format serving`: params only (no optimizer state; `--dtype bfloat16` halves them) as a sharded
orbax checkpoint that restores onto any mesh, plus the tokenizer and a copy of the VQ-GAN, so that
`launch/generate.py --workdir DIR` runs from that folder alone (`llmcxr_jax.llm.serving`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.llm import hf_io, serving  # noqa: E402
from llmcxr_jax.parallel import mesh as mesh_lib  # noqa: E402

Exporter = Callable[[argparse.Namespace, serving.Bundle], pathlib.Path]


def export_hf(args: argparse.Namespace, bundle: serving.Bundle) -> pathlib.Path:
    return hf_io.export_hf(bundle.params, bundle.model_config, bundle.vocab, args.out,
                           max_shard_size=args.max_shard_size, dtype=args.dtype or "float32",
                           overwrite=args.overwrite, progress=mesh_lib.is_main_process())


def export_serving(args: argparse.Namespace, bundle: serving.Bundle) -> pathlib.Path:
    if args.dtype not in (None, *serving.PARAM_DTYPES):
        raise SystemExit(f"--dtype {args.dtype}: --format serving takes {serving.PARAM_DTYPES}")
    if bundle.vqgan_dir is None and mesh_lib.is_main_process():
        print(f"note: {args.workdir} holds no VQ-GAN and no --vqgan was given: the serving folder "
              f"will hold the LLM only (text tasks, or image codes as input)")
    return serving.export_bundle(bundle, args.out, param_dtype=args.dtype,
                                 overwrite=args.overwrite)


# One entry per output format: name -> (function(args, bundle) -> written path, needs the VQ-GAN).
FORMATS: dict[str, tuple[Exporter, bool]] = {"hf": (export_hf, False),
                                             "serving": (export_serving, True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="training-run workdir, LLM workdir or serving folder")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--mesh", default="-1", help="mesh to restore onto (default: all on fsdp)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--dtype", choices=sorted(hf_io.DTYPES), default=None,
                        help="dtype of the written weights (hf default float32; serving default: "
                             "as trained; serving takes float32 or bfloat16)")
    hf = parser.add_argument_group("--format hf")
    hf.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB, 500MB, 1GiB")
    srv = parser.add_argument_group("--format serving")
    srv.add_argument("--vqgan", default=None,
                     help="VQ-GAN directory to bundle (default: the workdir's own)")
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
        raise SystemExit(f"--workdir: {e}") from None
    out = exporter(args, bundle)
    if mesh_lib.is_main_process():
        print(f"exported {args.workdir} ({bundle.kind}, step {bundle.step}) as {args.format} "
              f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
