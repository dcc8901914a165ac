"""Encode CXR images into VQ-GAN codes (uint16 [h, w] per image id = file stem).

    python launch/encode_images.py --vqgan WORKDIR --images DIR_OR_LIST --out CODES

Batched and jitted over all devices; resumable (ids already in CODES are skipped); unreadable
images are skipped, listed with their reason in CODES/failed.json and counted at the end.
Read the result with `llmcxr_jax.vqgan.encode.load_codes(CODES)`.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices  # noqa: E402

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

from llmcxr_jax.vqgan.encode import encode_images  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqgan", required=True, help="workdir with vqgan/ or a VQ-GAN checkpoint dir")
    parser.add_argument("--images", required=True, help="image directory or a text file of paths")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="codes directory")
    parser.add_argument("--batch", type=int, default=32, help="global batch (rounded up to devices)")
    parser.add_argument("--threads", type=int, default=4, help="image decoding threads")
    parser.add_argument("--shard-size", type=int, default=4096, help="codes per .npz shard")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        encode_images(args.vqgan, args.images, args.out, batch_size=args.batch,
                      threads=args.threads, shard_size=args.shard_size,
                      progress=not args.no_progress)
    except FileNotFoundError as err:  # a missing --vqgan or --images: one line
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
