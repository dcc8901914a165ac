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

import dataclasses

from llmcxr_jax import cli


def default_compute_dtype() -> str:
    """bf16 compute on TPU/GPU; fp32 on CPU, where XLA's bf16 matmuls are far slower."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def main(argv: list[str] | None = None) -> int:
    from llmcxr_jax.llm import checkpoint, hf_io

    parser = cli.parser(__doc__)
    parser.add_argument("--hf-dir", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--out", required=True, help="the LLM workdir to create")
    parser.add_argument("--n-image", type=cli.positive_int, default=None,
                        help="image codes after the text ids (default: DIR's llmcxr_vocab.json, "
                             "else 1024)")
    parser.add_argument("--resize", choices=hf_io.RESIZE_METHODS, default="mean_cov",
                        help="init of the new embedding rows (mean_cov: transformers' default)")
    cli.add_seed(parser, what=" of the mean_cov sampling")
    cli.add_mesh(parser, what=" the weights stream onto")
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the compute dtype saved in the config (params stay float32); auto: "
                             "float32 on CPU, else bfloat16")
    cli.add_overwrite(parser)
    cli.add_no_progress(parser)
    args = parser.parse_args(argv)

    from llmcxr_jax.parallel import mesh as mesh_lib

    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.mesh_from_flag(args.mesh)
    show = mesh_lib.is_main_process() and not args.no_progress
    config, params, vocab = hf_io.import_hf(args.hf_dir, mesh, n_image=args.n_image,
                                            resize=args.resize, seed=args.seed, progress=show)
    dtype = default_compute_dtype() if args.compute_dtype == "auto" else args.compute_dtype
    config = dataclasses.replace(config, dtype=dtype)
    out = checkpoint.save_llm(args.out, config, params, vocab, overwrite=args.overwrite)
    if mesh_lib.is_main_process():
        print(f"imported {args.hf_dir}: {vocab.n_text} text + {vocab.n_image} image ids in "
              f"{config.vocab_size} rows, {config.num_layers} layers -> {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
