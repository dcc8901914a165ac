"""Decode VQ-GAN codes back to images: one PNG per image id, plus grid.png for a quick look.

    python launch/decode_images.py --vqgan WORKDIR --codes CODES --out DIR
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices  # noqa: E402

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

from llmcxr_jax.vqgan.encode import decode_codes  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqgan", required=True, help="workdir with vqgan/ or a VQ-GAN checkpoint dir")
    parser.add_argument("--codes", required=True, type=pathlib.Path, help="codes directory")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ids", nargs="*", default=None, help="only these image ids")
    parser.add_argument("--grid", type=int, default=64, help="images in grid.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    decode_codes(args.vqgan, args.codes, args.out, batch_size=args.batch, ids=args.ids,
                 grid_size=args.grid, progress=not args.no_progress)


if __name__ == "__main__":
    main()
