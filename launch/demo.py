"""A local web page for a trained model: draw a chest X-ray from a report, read one into a report
(with the labeler's findings), ask about one, or give a plain text instruction.

    python launch/demo.py --workdir W [--port 7860] [--host 127.0.0.1] [--seed N] [--guidance S]

W is a training run's workdir, an LLM workdir or a serving export (`launch/export.py --format
serving`); nothing is written into it. The page listens on 127.0.0.1 (this machine only) unless
`--host` says otherwise; Ctrl-C stops it. Each tab is also an HTTP API endpoint (`/draw`, `/read`,
`/answer`, `/instruct`) that `gradio_client` can call. Needs the `[demo]` extra (gradio). See
`llmcxr_jax/demo/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import sys
import tempfile

from llmcxr_jax import cli
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core


def _port(text: str) -> int:
    port = cli.positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {port}")
    return port


def parse_args(argv):
    parser = cli.parser(__doc__)
    parser.add_argument("--workdir", required=True,
                        help="a training run's workdir, an LLM workdir or a serving export")
    parser.add_argument("--port", type=_port, default=7860, help="the page's TCP port")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (0.0.0.0: every interface)")
    cli.add_seed(parser, None, " every tab starts with (default: a new random one per request; "
                               "each result shows the seed that reproduces it)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="the report -> image tab's initial guidance scale S (default: the "
                             "run's `guidance` config value, else 1)")
    cli.add_mesh(parser, what=" for the LLM params")
    cli.add_vqgan(parser, what=" (default: W's own)")
    cli.add_step(parser)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on the page while a request runs (the server "
                             "prints one line per request either way)")
    args = parser.parse_args(argv)
    if args.guidance is not None and not 0.0 <= args.guidance < float("inf"):
        parser.error(f"argument --guidance: expected a finite number >= 0, got {args.guidance}")
    return args


def _stop(*_) -> None:
    """SIGTERM ends the process like Ctrl-C: the page closes and the scratch folder is removed
    (a second SIGTERM during that cleanup is ignored, so it finishes)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        raise cli.Failure("the demo needs gradio: pip install -e '.[demo]'")
    from llmcxr_jax.demo.session import DemoSession
    from llmcxr_jax.llm import serving
    from llmcxr_jax.parallel import mesh as mesh_lib

    bundle = serving.load_bundle(args.workdir, mesh_lib.mesh_from_flag(args.mesh),
                                 vqgan=args.vqgan, step=args.step)
    if args.guidance is not None:
        bundle = dataclasses.replace(bundle, guidance=args.guidance)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page calls no one
    from llmcxr_jax.demo import page as page_lib

    signal.signal(signal.SIGTERM, _stop)
    with tempfile.TemporaryDirectory(prefix="llmcxr-demo-") as scratch:
        session = DemoSession(bundle, scratch)
        page = page_lib.build_page(session, start_seed=-1 if args.seed is None else args.seed,
                                   show_progress=not args.no_progress)
        try:
            url = page_lib.serve(page, args.host, args.port)
        except OSError as err:  # gradio's words: "Cannot find empty port in range: P-P. ..."
            raise cli.Failure(f"--port {args.port}: cannot listen on {args.host}:{args.port} "
                              f"({str(err).split('. ')[0]}); pass another --port") from None
        print(f"demo: {bundle.path} ({bundle.kind}, step {bundle.step}) at {url} "
              f"(Ctrl-C stops)", flush=True)
        try:
            page.block_thread()
        finally:
            page.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
