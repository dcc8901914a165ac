"""Export an LLM workdir (imported or trained) to another checkpoint format.

    python launch/export.py --workdir WORKDIR --format hf --out DIR [--max-shard-size 2GB]
                            [--dtype float32|bfloat16|float16] [--step N] [--mesh -1]

`--format hf`: a transformers `GPTNeoXForCausalLM` directory (config.json, safetensors shards with
`model.safetensors.index.json`, tokenizer files) that `from_pretrained` loads without warnings.
The params are restored into shardings on `--mesh` and gathered one tensor at a time; process 0
writes; DIR is written as DIR.tmp and renamed when complete.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.configs import ModelConfig  # noqa: E402
from llmcxr_jax.llm import checkpoint, hf_io  # noqa: E402
from llmcxr_jax.parallel import mesh as mesh_lib  # noqa: E402
from llmcxr_jax.text.vocab import Vocab  # noqa: E402

Exporter = Callable[[argparse.Namespace, ModelConfig, Any, Vocab], pathlib.Path]


def export_hf(args: argparse.Namespace, config: ModelConfig, params: Any,
              vocab: Vocab) -> pathlib.Path:
    return hf_io.export_hf(params, config, vocab, args.out, max_shard_size=args.max_shard_size,
                           dtype=args.dtype, overwrite=args.overwrite,
                           progress=mesh_lib.is_main_process())


# One entry per output format: name -> function(args, config, params, vocab) -> written path.
FORMATS: dict[str, Exporter] = {"hf": export_hf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="LLM workdir (config.json, checkpoints/)")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--mesh", default="-1", help="mesh to restore onto (default: all on fsdp)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    hf = parser.add_argument_group("--format hf")
    hf.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB, 500MB, 1GiB")
    hf.add_argument("--dtype", choices=sorted(hf_io.DTYPES), default="float32",
                    help="dtype of the written weights")
    args = parser.parse_args(argv)

    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.mesh_from_flag(args.mesh)
    config, params, vocab = checkpoint.load_llm(args.workdir, mesh=mesh, step=args.step)
    out = FORMATS[args.format](args, config, params, vocab)
    if mesh_lib.is_main_process():
        print(f"exported {args.workdir} as {args.format} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
