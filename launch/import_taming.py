"""Import a taming-transformers VQ-GAN checkpoint into the project's VQ-GAN checkpoint format.

    python launch/import_taming.py --ckpt last.ckpt --config project.yaml --out WORKDIR

writes WORKDIR/vqgan/{config.json, params.safetensors} (load with
`llmcxr_jax.vqgan.checkpoint.load_vqgan`).
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.vqgan.taming_import import import_taming  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=pathlib.Path, help="taming / Lightning .ckpt")
    parser.add_argument("--config", required=True, type=pathlib.Path, help="taming project yaml")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="workdir; writes OUT/vqgan/")
    parser.add_argument("--subdir", default="vqgan", help="folder inside --out (default: vqgan)")
    args = parser.parse_args(argv)
    out = args.out / args.subdir
    try:
        config, summary = import_taming(args.ckpt, args.config, out)
    except FileNotFoundError as err:  # a missing --ckpt or --config: one line
        raise SystemExit(f"error: {err}") from None
    print(summary)
    print(f"wrote {out} ({config.resolution} px, f{config.downsample_factor}, "
          f"{config.n_embed} codes, {config.tokens_per_image} tokens per image)")


if __name__ == "__main__":
    main()
