"""Import a taming-transformers VQ-GAN checkpoint into the project's VQ-GAN checkpoint format.

    python launch/import_taming.py --ckpt last.ckpt --yaml project.yaml --out WORKDIR

writes WORKDIR/vqgan/{config.json, params.safetensors} (load with
`llmcxr_jax.vqgan.checkpoint.load_vqgan`).
"""

import pathlib

from llmcxr_jax import cli


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--ckpt", required=True, type=pathlib.Path,
                        help="the taming / Lightning .ckpt")
    parser.add_argument("--yaml", required=True, type=pathlib.Path,
                        help="the taming project yaml that the checkpoint was trained with")
    parser.add_argument("--out", required=True, type=pathlib.Path,
                        help="a workdir; the VQ-GAN goes to OUT/SUBDIR/")
    parser.add_argument("--subdir", default="vqgan", help="the folder inside --out")
    cli.add_alias(parser, "--config", "--yaml")
    args = parser.parse_args(argv)

    from llmcxr_jax.vqgan.taming_import import import_taming

    out = args.out / args.subdir
    config, summary = import_taming(args.ckpt, args.yaml, out)
    print(summary)
    print(f"wrote {out} ({config.resolution} px, f{config.downsample_factor}, "
          f"{config.n_embed} codes, {config.tokens_per_image} tokens per image)")


if __name__ == "__main__":
    cli.run(main)
