"""Train the VQ-GAN (taming's GAN recipe + the paper's clinical feature loss) on CXR images.

    python launch/train_vqgan.py --images DIR_OR_LIST --workdir W --model phantom-f8 \
        --steps 20000 --batch-size 8 --set disc_start=5000 --set vqgan.n_embed=1024

Resumes from W's latest checkpoint (and W/config.json) when there is one; `--set` then only
changes what it names. SIGTERM (or Ctrl-C) saves a checkpoint at the current step and exits 0;
the same command resumes from it. Model fields are set as `vqgan.<field>`, training fields by name (see
`VQGANTrainConfig` in llmcxr_jax/configs.py). The final model is written to W/vqgan/ for
`launch/encode_images.py --vqgan W`.

Perceptual loss: `--set lpips_vgg_path=vgg16.pth` (torchvision's vgg16 state dict, local file;
heads from the `lpips` wheel: `pip install --no-deps lpips`). Clinical loss: `--clinical-net DIR`,
a findings classifier folder (`launch/train_classifier.py` writes one; not the one that will
score the VQ-GAN), or `--clinical-net package.module:factory`, where `factory()` returns a
`llmcxr_jax.vqgan.losses.FeatureNet`.
"""

import importlib
import pathlib

from llmcxr_jax import cli, configs
from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core


def load_factory(spec: str):
    """`package.module:function` -> the function (imported, never evaluated from text)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise cli.UsageError(f"--clinical-net {spec!r}: expected a classifier folder or "
                             f"package.module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise cli.UsageError(f"--clinical-net {spec}: {cli.one_line(err)}") from None


def clinical_net(spec: str):
    """--clinical-net: a classifier folder -> its FeatureNet; else a FeatureNet factory."""
    if not pathlib.Path(spec).is_dir():
        return load_factory(spec)()
    from llmcxr_jax.vqgan import clinical

    try:
        return clinical.feature_net(spec)
    except (FileNotFoundError, ValueError) as err:
        raise cli.Failure(f"--clinical-net {spec}: {cli.one_line(err)}") from None


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--images", required=True,
                        help="a folder of images, or a text file of image paths")
    parser.add_argument("--workdir", required=True, type=pathlib.Path,
                        help="the run's folder: checkpoints, config.json, the final vqgan/ "
                             "(resumed if it holds a run)")
    parser.add_argument("--model", default=None, choices=sorted(configs.VQGAN_PRESETS),
                        help="VQ-GAN preset (default: phantom-f8, or the workdir's config when "
                             "resuming)")
    parser.add_argument("--steps", type=cli.positive_int, default=None,
                        help="training steps (default: the preset's)")
    cli.add_batch_size(parser, None, " (default: the preset's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field: vqgan.<field> for the model, <field> for "
                             "training (VQGANTrainConfig); repeatable")
    parser.add_argument("--clinical-net", default=None, metavar="DIR|MODULE:FACTORY",
                        help="the clinical feature loss's classifier: a folder as "
                             "launch/train_classifier.py writes, or a FeatureNet factory "
                             "(default: none)")
    cli.add_no_progress(parser)
    cli.add_alias(parser, "--preset", "--model")
    cli.add_alias(parser, "--batch", "--batch-size")
    args = parser.parse_args(argv)

    from llmcxr_jax.data.images import list_images
    from llmcxr_jax.train.preemption import PreemptionWatcher
    from llmcxr_jax.vqgan import losses, train
    from llmcxr_jax.vqgan.input_pipeline import image_batches

    resumed = train.read_run_config(args.workdir)
    if resumed is not None and args.model is None:
        vq_config, config = resumed
    else:
        model = args.model or "phantom-f8"
        vq_config, config = configs.vqgan_preset(model), configs.VQGANTrainConfig(vqgan=model)
    sets = list(args.sets)
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    if args.batch_size is not None:
        sets.append(f"batch_size={args.batch_size}")
    try:
        vq_config, config = train.apply_overrides(vq_config, config, sets)
    except (KeyError, ValueError) as err:
        raise cli.UsageError(cli.one_line(err)) from None
    clinical = clinical_net(args.clinical_net) if args.clinical_net else None

    paths = list_images(args.images)
    print(f"{len(paths)} image files from {args.images}")
    batches, bad = image_batches(paths, vq_config.resolution, config.batch_size, seed=config.seed,
                                 read_threads=config.read_threads)
    nets = train.FrozenNets(
        perceptual=(losses.lpips_net(config.lpips_vgg_path, config.lpips_heads_path)
                    if config.perceptual_weight > 0 else None),
        clinical=clinical)
    with PreemptionWatcher() as watcher:
        state = train.train(vq_config, config, args.workdir, batches, nets=nets,
                            data_iter=batches, progress=not args.no_progress,
                            extra_config={"images": str(args.images)}, stop=watcher.should_stop)
    print(f"skipped images: {len(bad.reasons)} files ({bad.skips} skips)")
    for path, reason in sorted(bad.reasons.items()):
        print(f"  {path}: {reason}")
    if int(state.step) < config.steps:
        print("preempted: checkpoint saved; run the same command again to resume")


if __name__ == "__main__":
    cli.run(main)
