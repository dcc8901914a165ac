"""Decode VQ-GAN codes back to images: one PNG per image id, plus grid.png for a quick look.

    python launch/decode_images.py --vqgan WORKDIR --codes CODES --out DIR
"""

from llmcxr_jax import cli
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    cli.add_vqgan(parser, required=True)
    parser.add_argument("--codes", required=True, help="a codes folder (launch/encode_images.py)")
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    cli.add_batch_size(parser, 32)
    parser.add_argument("--ids", nargs="*", default=None, help="only these image ids (default: all)")
    parser.add_argument("--grid", type=cli.non_negative_int, default=64,
                        help="images in grid.png")
    cli.add_no_progress(parser)
    cli.add_alias(parser, "--batch", "--batch-size")
    args = parser.parse_args(argv)

    from llmcxr_jax.vqgan.encode import decode_codes

    try:
        decode_codes(args.vqgan, args.codes, args.out, batch_size=args.batch_size, ids=args.ids,
                     grid_size=args.grid, progress=not args.no_progress)
    except (KeyError, ValueError) as err:  # ids not in --codes, codes of another VQ-GAN's shape
        raise cli.Failure(cli.one_line(err)) from None  # the message names the codes folder


if __name__ == "__main__":
    cli.run(main)
