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

from llmcxr_jax import cli, tasks
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

TASKS = tasks.NAMES  # llmcxr_jax/tasks.py imports no JAX: --help and usage errors stay quick


def _phrasing(value: str) -> int | str:
    if value == "random":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither 0..9 nor 'random'") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--workdir", required=True,
                        help="a training-run workdir, LLM workdir or serving folder")
    parser.add_argument("--task", required=True, choices=TASKS, help="what to generate")
    inputs = parser.add_argument_group("inputs (flags, repeatable, or --input)")
    inputs.add_argument("--report", action="append", default=[],
                        help="report2image: a report to draw")
    inputs.add_argument("--image", action="append", default=[],
                        help="image2report, vqa: an image file (png/jpg/dcm) or its codes "
                             "(.npy/.npz)")
    inputs.add_argument("--question", action="append", default=[],
                        help="vqa: a question about the --image of the same position")
    inputs.add_argument("--instruction", action="append", default=[],
                        help="instruct: a plain text instruction")
    inputs.add_argument("--context", action="append", default=[],
                        help="instruct: optional context for the --instruction of the same "
                             "position")
    inputs.add_argument("--input", default=None,
                        help="a JSONL file of records, or (image2report) a folder of images")
    parser.add_argument("--out", default=None, help="output folder (default: W/generated/TASK)")
    cli.add_batch_size(parser, 8)
    cli.add_seed(parser, what=" of item 0; item i uses SEED + i")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                        help="text tasks (default 128); report2image always makes one image")
    parser.add_argument("--phrasing", type=_phrasing, default=0,
                        help="instruction phrasing 0..9 of the two image tasks, or 'random'")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: 1 for text tasks; report2image: "
                             "the run's `image_temperature` config value, else 1)")
    parser.add_argument("--top-k", type=cli.non_negative_int, default=None,
                        help="keep the K most likely tokens, 0 = all (default: 0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling mass (default: 0.92 for text tasks, 1 for "
                             "report2image)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="report2image: classifier-free guidance scale S, mixing "
                             "uncond + S * (cond - uncond) each step; 1 = plain sampling "
                             "(default: the run's `guidance` config value, else 1)")
    cli.add_mesh(parser, what=" the LLM params are restored onto")
    cli.add_vqgan(parser, what=" (default: W's own)")
    cli.add_step(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmcxr_jax.llm import generate_job, serving
    from llmcxr_jax.parallel import mesh as mesh_lib

    job = generate_job.JobConfig(task=args.task, batch_size=args.batch_size, seed=args.seed,
                                 greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, phrasing=args.phrasing,
                                 guidance=args.guidance)
    items = generate_job.read_items(
        args.task, reports=args.report, images=args.image, questions=args.question,
        instructions=args.instruction, contexts=args.context, input_path=args.input)
    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.mesh_from_flag(args.mesh)
    try:
        bundle = serving.load_bundle(args.workdir, mesh, vqgan=args.vqgan, step=args.step,
                                     load_vqgan=tasks.get(args.task).uses_vqgan)
    except serving.BundleError as e:
        raise serving.BundleError(f"--workdir: {e}") from None
    out = args.out or pathlib.Path(args.workdir) / "generated" / args.task
    generate_job.run_job(bundle, items, job, out)
    return 0


if __name__ == "__main__":
    cli.run(main)
