"""Encode CXR images into VQ-GAN codes (uint16 [h, w] per image id = file stem).

    python launch/encode_images.py --vqgan WORKDIR --images DIR_OR_LIST --out CODES

Batched and jitted over all devices; resumable (ids already in CODES are skipped); unreadable
images are skipped, listed with their reason in CODES/failed.json and counted at the end.
Read the result with `llmcxr_jax.vqgan.encode.load_codes(CODES)`.
"""

from llmcxr_jax import cli
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    cli.add_vqgan(parser, required=True)
    parser.add_argument("--images", required=True,
                        help="a folder of images, or a text file of image paths")
    parser.add_argument("--out", required=True, help="the codes folder (resumed if it exists)")
    cli.add_batch_size(parser, 32, " (rounded up to a multiple of the devices)")
    parser.add_argument("--threads", type=cli.positive_int, default=4,
                        help="image decoding threads")
    parser.add_argument("--shard-size", type=cli.positive_int, default=4096,
                        help="codes per .npz shard")
    cli.add_no_progress(parser)
    cli.add_alias(parser, "--batch", "--batch-size")
    args = parser.parse_args(argv)

    from llmcxr_jax.vqgan.encode import encode_images

    try:
        encode_images(args.vqgan, args.images, args.out, batch_size=args.batch_size,
                      threads=args.threads, shard_size=args.shard_size,
                      progress=not args.no_progress)
    except ValueError as err:  # --out holds another VQ-GAN's codes; a codebook over uint16
        raise cli.Failure(cli.one_line(err)) from None


if __name__ == "__main__":
    cli.run(main)
