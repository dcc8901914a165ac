"""Import a local Hugging Face GPT-NeoX checkpoint (e.g. dolly-v2-3b) as an LLM workdir.

    python launch/import_hf.py --hf-dir DIR --out WORKDIR [--n-image 1024] [--resize mean_cov|mean]
                               [--mesh -1] [--compute-dtype auto|float32|bfloat16]

DIR holds `config.json`, the weights (`model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model*.bin`) and `tokenizer.json`. The Dolly specials
and the image ids are added to the tokenizer; the embedding and output matrices grow to the new
vocabulary (`--resize mean_cov`: transformers' default resize init, N(mean, 1e-9 cov) of the
existing rows; `--resize mean`: the mean). Tensors stream one by one into their shardings on
`--mesh` (default: every device on fsdp). WORKDIR gets config.json, tokenizer/ and checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from llmcxr_jax.llm import checkpoint, hf_io  # noqa: E402
from llmcxr_jax.parallel import mesh as mesh_lib  # noqa: E402


def default_compute_dtype() -> str:
    """bf16 compute on TPU/GPU; fp32 on CPU, where XLA's bf16 matmuls are far slower."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="local Hugging Face model directory")
    parser.add_argument("--out", required=True, help="workdir to create")
    parser.add_argument("--n-image", type=int, default=None,
                        help="image codes after the text ids (default: DIR's llmcxr_vocab.json, "
                             "else 1024)")
    parser.add_argument("--resize", choices=hf_io.RESIZE_METHODS, default="mean_cov",
                        help="init of new embedding rows (default: transformers' mean_cov)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mean_cov sampling")
    parser.add_argument("--mesh", default="-1",
                        help="e.g. 4x4 (data x fsdp) or data:2,fsdp:4 (default: all on fsdp)")
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype saved in the config (params stay float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.mesh_from_flag(args.mesh)
    try:
        config, params, vocab = hf_io.import_hf(args.hf_dir, mesh, n_image=args.n_image,
                                                resize=args.resize, seed=args.seed,
                                                progress=mesh_lib.is_main_process())
    except FileNotFoundError as err:  # a missing --hf-dir or file in it: one line
        raise SystemExit(f"error: --hf-dir: {err}") from None
    dtype = default_compute_dtype() if args.compute_dtype == "auto" else args.compute_dtype
    config = dataclasses.replace(config, dtype=dtype)
    out = checkpoint.save_llm(args.out, config, params, vocab, overwrite=args.overwrite)
    if mesh_lib.is_main_process():
        print(f"imported {args.hf_dir}: {vocab.n_text} text + {vocab.n_image} image ids in "
              f"{config.vocab_size} rows, {config.num_layers} layers -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
