"""Write the phantom CXR world in MIMIC-CXR-JPG's layout.

    python launch/make_phantoms.py --out DIR --n-studies 1000 --size 256 --seed 0

DIR is written whole or not at all: SIGTERM stops the drawing, writes nothing and exits 0 (as a
preempted training run does); the same command draws it again.
"""

import json
import signal
import threading

from llmcxr_jax import cli


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--n-studies", type=cli.positive_int, default=1000,
                   help="number of studies (each has a frontal image and sometimes a lateral)")
    p.add_argument("--size", type=cli.positive_int, default=256, help="image side in pixels")
    cli.add_seed(p, what=" of the world")
    p.add_argument("--n-instructions", type=cli.non_negative_int, default=3000,
                   help="number of procedural text instructions")
    p.add_argument("--workers", type=cli.non_negative_int, default=0,
                   help="render processes (0 = all cores)")
    cli.add_overwrite(p)
    cli.add_no_progress(p)
    cli.add_alias(p, "--n", "--n-studies")
    cli.add_alias(p, "--instructions", "--n-instructions")
    args = p.parse_args(argv)

    from llmcxr_jax.data.phantom_world import WorldConfig, write_world

    cfg = WorldConfig(n_studies=args.n_studies, size=args.size, seed=args.seed,
                      n_instructions=args.n_instructions)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    summary = write_world(args.out, cfg, workers=args.workers or None, overwrite=args.overwrite,
                          progress=not args.no_progress, stop=stop.is_set)
    if summary is None:
        print(f"preempted: nothing written to {args.out}; run the same command again")
        return
    print(f"wrote {summary['images']} images / {summary['studies']} studies / "
          f"{summary['subjects']} subjects to {summary['out']} in {summary['seconds']} s "
          f"({summary['images_per_s']} images/s at {args.size} px, {summary['workers']} workers)")
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
