"""Generate with a trained LLM-CXR model: report -> image, image -> report, VQA, instructions.

    python launch/generate.py --workdir W --task report2image --report "..." [--report ...]
    python launch/generate.py --workdir W --task report2image --input reports.jsonl   # {"report"}
    python launch/generate.py --workdir W --task image2report --image a.png [--image b.npy]
    python launch/generate.py --workdir W --task image2report --input FOLDER          # images/.npy
    python launch/generate.py --workdir W --task vqa --image a.png --question "..."
    python launch/generate.py --workdir W --task vqa --input q.jsonl          # {"image","question"}
    python launch/generate.py --workdir W --task instruct --instruction "..." [--context "..."]
    python launch/generate.py --workdir W --task instruct --input i.jsonl  # {"instruction", ...}
        [--out DIR] [--batch-size 8] [--seed 0] [--greedy] [--max-new-tokens 128]
        [--phrasing 0|random] [--top-p P] [--top-k K] [--temperature T] [--mesh -1] [--vqgan DIR]
        [--guidance S]      # report2image: classifier-free guidance scale (1 = plain sampling)

W is a training run's workdir, an LLM workdir or a serving folder (`launch/export.py --format
serving`). Writes OUT/outputs.jsonl (prompt, phrasing, output, seed per item), and for
report2image one PNG per item plus OUT/grid.png. Item i uses seed SEED + i: rerun it alone with
`--seed SEED+i` for the same output. See `llmcxr_jax/llm/generate_job.py`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices  # noqa: E402

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

from llmcxr_jax.llm import generate_job, serving  # noqa: E402
from llmcxr_jax.parallel import mesh as mesh_lib  # noqa: E402


def _phrasing(value: str) -> int | str:
    if value == "random":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither 0..9 nor 'random'") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="training-run workdir, LLM workdir or serving folder")
    parser.add_argument("--task", required=True, help=f"one of {generate_job.TASKS}")
    inputs = parser.add_argument_group("inputs (flags, repeatable, or --input)")
    inputs.add_argument("--report", action="append", default=[])
    inputs.add_argument("--image", action="append", default=[],
                        help="an image file (png/jpg/dcm) or its codes (.npy/.npz)")
    inputs.add_argument("--question", action="append", default=[])
    inputs.add_argument("--instruction", action="append", default=[])
    inputs.add_argument("--context", action="append", default=[])
    inputs.add_argument("--input", default=None,
                        help="a JSONL file of records, or (image2report) a folder of images")
    parser.add_argument("--out", default=None, help="output folder (default: W/generated/TASK)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="text tasks (default 128); report2image always makes one image")
    parser.add_argument("--phrasing", type=_phrasing, default=0,
                        help="instruction phrasing 0..9 of the two image tasks, or 'random'")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--guidance", type=float, default=None,
                        help="report2image: classifier-free guidance scale S, mixing "
                             "uncond + S * (cond - uncond) each step; 1 = plain sampling "
                             "(default: the run's `guidance` config value, else 1)")
    parser.add_argument("--mesh", default="-1", help="mesh for the LLM params (default all fsdp)")
    parser.add_argument("--vqgan", default=None, help="VQ-GAN directory (default: W's own)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = generate_job.JobConfig(task=args.task, batch_size=args.batch_size, seed=args.seed,
                                     greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, phrasing=args.phrasing,
                                     guidance=args.guidance)
        items = generate_job.read_items(
            args.task, reports=args.report, images=args.image, questions=args.question,
            instructions=args.instruction, contexts=args.context, input_path=args.input)
    except generate_job.InputError as e:
        raise SystemExit(f"error: {e}") from None
    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.mesh_from_flag(args.mesh)
    try:
        bundle = serving.load_bundle(args.workdir, mesh, vqgan=args.vqgan, step=args.step,
                                     load_vqgan=args.task != "instruct")  # text only
    except serving.BundleError as e:
        raise SystemExit(f"error: --workdir: {e}") from None
    out = args.out or pathlib.Path(args.workdir) / "generated" / args.task
    try:
        generate_job.run_job(bundle, items, job, out)
    except (generate_job.InputError, serving.BundleError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
