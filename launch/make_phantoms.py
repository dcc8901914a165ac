"""Write the phantom CXR world in MIMIC-CXR-JPG's layout.

    python launch/make_phantoms.py --out DIR --n 1000 --size 256 --seed 0
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.data.phantom_world import WorldConfig, write_world  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--n", type=int, default=1000,
                   help="number of studies (each has a frontal image and sometimes a lateral)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instructions", type=int, default=3000,
                   help="number of procedural text instructions")
    p.add_argument("--workers", type=int, default=0, help="render processes (0 = all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    cfg = WorldConfig(n_studies=args.n, size=args.size, seed=args.seed,
                      n_instructions=args.instructions)
    summary = write_world(args.out, cfg, workers=args.workers or None, overwrite=args.overwrite)
    print(f"wrote {summary['images']} images / {summary['studies']} studies / "
          f"{summary['subjects']} subjects to {summary['out']} in {summary['seconds']} s "
          f"({summary['images_per_s']} images/s at {args.size} px, {summary['workers']} workers)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
