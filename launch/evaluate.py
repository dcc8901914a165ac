"""The paper's evaluation protocol on a training run's workdir.

    python launch/evaluate.py --workdir workdir/phantom
    python launch/evaluate.py --workdir workdir/phantom --guidance 3,2,5   # report -> image at
                                          # guidance 3 (headline), 1, 2 and 5 (same keys)

On the held-out test split of the run's world: report -> image (CXR-classifier AUROC / F1 of the
generated images, beside the VQ-GAN reconstructions of the real ones and chance; FID in the
classifier's feature space), image -> report (labeler F1 / AUROC / Jaccard, BLEU-1/4, ROUGE-L;
the original's top-p sampling, and greedy decoding as a secondary block),
language retention (held-out instruction perplexity and exact match, base vs fine-tuned), the
conditioning gap of both directions on train and test pairs, 95 % bootstrap intervals of the
headline numbers and the learning curve of the run's stages. Writes
OUT/eval.json, OUT/report.md (tables and image grids), OUT/reports.jsonl and
OUT/predictions.npz; OUT defaults to WORKDIR/eval. Without --classifier it uses
WORKDIR/classifier, training one on the world's train split first if there is none.
"""

import argparse
import json

from llmcxr_jax import cli
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

from llmcxr_jax.eval.protocol import SUBSETS, EvalOptions, evaluate  # noqa: E402


def _scales(value: str) -> tuple[float, ...]:
    """`--guidance 3` or `--guidance 3,1.5,5`."""
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}"
                                         ) from None


def main(argv=None) -> int:
    d = EvalOptions()
    p = cli.parser(__doc__)
    p.add_argument("--workdir", required=True, help="a launch/train.py workdir")
    p.add_argument("--classifier", default=d.classifier,
                   help="a CXR classifier checkpoint dir (default WORKDIR/classifier, trained "
                        "if absent)")
    p.add_argument("--n-test", type=cli.int_at_least(2), default=d.n_test,
                   help="the first N test items, at least 2 for FID (default: all)")
    cli.add_batch_size(p, d.batch_size, " (generation)")
    cli.add_seed(p, d.seed, " of generation and the bootstrap")
    p.add_argument("--base", default=d.base,
                   help="base LLM for language retention (default WORKDIR/base, else the run's "
                        "init_from, else a random init)")
    p.add_argument("--out", default=d.out, help="output folder (default WORKDIR/eval)")
    p.add_argument("--n-language", type=cli.non_negative_int, default=d.n_language,
                   help="held-out instructions for language retention")
    p.add_argument("--report-tokens", type=cli.positive_int, default=d.report_tokens,
                   help="max new tokens of a generated report")
    p.add_argument("--n-show", type=cli.non_negative_int, default=d.n_show,
                   help="items shown in report.md")
    p.add_argument("--subset", choices=SUBSETS, default=d.subset,
                   help="test images: frontal (default), stage2 (earliest frontal study per "
                        "subject) or all")
    p.add_argument("--report-stage", type=int, choices=(1, 2), default=d.report_stage,
                   help="report section: 1 = FINDINGS + IMPRESSION, 2 = IMPRESSION (default: the "
                        "final model's stage)")
    cli.add_mesh(p, d.mesh, " the LLM params are restored onto")
    p.add_argument("--classifier-steps", type=cli.positive_int, default=d.classifier_steps,
                   help="training steps when a classifier has to be trained")
    p.add_argument("--guidance", type=_scales, default=d.guidance,
                   help="report -> image classifier-free guidance scale(s) S, e.g. 3 or 3,2,5: "
                        "the first is the headline (default: the run's `guidance` config "
                        "value); S = 1 is always measured too (eval.json "
                        "report2image.by_guidance)")
    p.add_argument("--image-temperature", type=float, default=d.image_temperature,
                   help="sampling temperature of the report -> image codes, at every S "
                        "(default: the run's `image_temperature` config value)")
    cli.add_no_progress(p)
    args = p.parse_args(argv)
    options = EvalOptions(
        classifier=args.classifier, n_test=args.n_test, batch_size=args.batch_size,
        seed=args.seed, base=args.base, out=args.out, n_language=args.n_language,
        report_tokens=args.report_tokens, n_show=args.n_show, subset=args.subset,
        report_stage=args.report_stage, mesh=args.mesh,
        classifier_steps=args.classifier_steps, guidance=args.guidance,
        image_temperature=args.image_temperature, progress=not args.no_progress)
    result = evaluate(args.workdir, options)
    r2i, i2r, lang = result["report2image"], result["image2report"], result["language"]
    print(json.dumps({
        "n_test": result["n_test"],
        "report2image_guidance": r2i["guidance"],
        "report2image_temperature": r2i["temperature"],
        "report2image_auroc_macro": r2i["auroc"]["macro"],
        "report2image_auroc_macro_ci95": r2i["ci95"]["auroc_macro"],
        "report2image_gap_train": r2i["conditioning_gap"]["train"]["gap"],
        "report2image_gap_test": r2i["conditioning_gap"]["test"]["gap"],
        "image2report_gap_train": i2r["conditioning_gap"]["train"]["gap"],
        "image2report_gap_test": i2r["conditioning_gap"]["test"]["gap"],
        "report2image_f1_micro": r2i["f1"]["micro"],
        "report2image_fid": r2i["fid"],
        "report2image_by_guidance": {s: {"auroc_macro": v["auroc"]["macro"],
                                         "f1_micro": v["f1"]["micro"], "fid": v["fid"]}
                                     for s, v in r2i["by_guidance"].items()},
        "image2report_f1_micro": i2r["f1"]["micro"],
        "image2report_f1_micro_chance": i2r["chance"]["f1"]["micro"],
        "image2report_f1_micro_greedy": i2r["greedy"]["f1"]["micro"],
        "image2report_bleu4": i2r["bleu4"], "image2report_rouge_l": i2r["rouge_l"],
        "perplexity_base": lang["base"]["perplexity"],
        "perplexity_finetuned": lang["finetuned"]["perplexity"],
        "accuracy_base": lang["base"]["accuracy"],
        "accuracy_finetuned": lang["finetuned"]["accuracy"],
    }))
    return 0


if __name__ == "__main__":
    cli.run(main)
