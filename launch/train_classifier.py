"""Train the CXR findings classifier used by the evaluation (report -> image AUROC/F1, FID
features) and by the VQ-GAN's clinical loss.

    python launch/train_classifier.py --world DIR --workdir WORKDIR --steps 900 --size 128

DIR is a MIMIC-CXR-JPG-layout folder (`python launch/make_phantoms.py` writes one). WORKDIR gets
config.json + params.safetensors (the classifier checkpoint; a classifier of your own in that
format can be used instead), train_config.json, metrics.jsonl and eval.json (per-finding test
AUROC / F1).
"""

import json

from llmcxr_jax import cli
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

from llmcxr_jax.eval.classifier import ClassifierConfig  # noqa: E402
from llmcxr_jax.eval.train_classifier import TrainClassifierConfig, train  # noqa: E402


def main(argv=None) -> None:
    d, m = TrainClassifierConfig(), ClassifierConfig()
    p = cli.parser(__doc__)
    p.add_argument("--world", required=True, help="a MIMIC-CXR-JPG-layout folder (CSVs + files/)")
    p.add_argument("--workdir", required=True,
                   help="the run's folder: the checkpoint, its config and metrics")
    p.add_argument("--steps", type=cli.positive_int, default=d.steps, help="training steps")
    p.add_argument("--size", type=cli.positive_int, default=m.image_size,
                   help="image side in pixels")
    cli.add_batch_size(p, d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--uncertain", choices=("ones", "zeros", "ignore"), default=d.uncertain,
                   help="CheXpert -1 in training: as positive, as negative, or masked out")
    p.add_argument("--blank", choices=("zeros", "ignore"), default=d.blank,
                   help="blank (not mentioned) labels: as negative, or masked out")
    p.add_argument("--labels", default=",".join(m.labels),
                   help="comma-separated CheXpert labels to predict")
    p.add_argument("--widths", default=",".join(map(str, m.widths)),
                   help="comma-separated channel widths of the stages")
    p.add_argument("--blocks", type=cli.positive_int, default=m.blocks,
                   help="residual blocks per stage")
    p.add_argument("--all-views", action="store_true", help="train on lateral images too")
    p.add_argument("--no-augment", action="store_true", help="no random flips, shifts or crops")
    p.add_argument("--eval-every", type=cli.positive_int, default=d.eval_every,
                   help="steps between evaluations on the validation split")
    p.add_argument("--max-images", type=cli.positive_int, default=None,
                   help="cap images per split (default: all)")
    cli.add_seed(p, d.seed)
    cli.add_no_progress(p)
    cli.add_alias(p, "--out", "--workdir")
    cli.add_alias(p, "--lr", "--learning-rate")
    args = p.parse_args(argv)
    try:
        model_cfg = ClassifierConfig(labels=tuple(s.strip() for s in args.labels.split(",")),
                                     widths=tuple(int(w) for w in args.widths.split(",")),
                                     blocks=args.blocks, image_size=args.size)
        cfg = TrainClassifierConfig(steps=args.steps, batch_size=args.batch_size,
                                    learning_rate=args.learning_rate,
                                    weight_decay=args.weight_decay, uncertain=args.uncertain,
                                    blank=args.blank, frontal_only=not args.all_views,
                                    augment=not args.no_augment, seed=args.seed,
                                    eval_every=args.eval_every)
    except ValueError as e:  # an unknown label, a width that is not a number
        raise cli.UsageError(cli.one_line(e)) from None
    result = train(args.world, args.workdir, model_cfg, cfg, max_images=args.max_images,
                   progress=not args.no_progress)
    test = result["eval"].get("test", {})
    print(json.dumps({"workdir": args.workdir, "steps": result["steps"],
                      "train_seconds": result["train_seconds"],
                      "test_auroc": test.get("auroc", {}).get("macro"),
                      "test_f1_micro": test.get("f1", {}).get("micro")}))


if __name__ == "__main__":
    cli.run(main)
