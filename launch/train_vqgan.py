"""Train the VQ-GAN (taming's GAN recipe + the paper's clinical feature loss) on CXR images.

    python launch/train_vqgan.py --images DIR_OR_LIST --workdir W --preset phantom-f8 \
        --steps 20000 --batch 8 --set disc_start=5000 --set vqgan.n_embed=1024

Resumes from W's latest checkpoint (and W/config.json) when there is one; `--set` then only
changes what it names. Model fields are set as `vqgan.<field>`, training fields by name (see
`VQGANTrainConfig` in llmcxr_jax/configs.py). The final model is written to W/vqgan/ for
`launch/encode_images.py --vqgan W`.

Perceptual loss: `--set lpips_vgg_path=vgg16.pth` (torchvision's vgg16 state dict, local file;
heads from the `lpips` wheel: `pip install --no-deps lpips`). Clinical loss: `--clinical-net
package.module:factory`, where `factory()` returns a `llmcxr_jax.vqgan.losses.FeatureNet`.
"""

import argparse
import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices  # noqa: E402

split_cpu_into_devices()  # before JAX is imported: one XLA CPU device per core

from llmcxr_jax import configs  # noqa: E402
from llmcxr_jax.data.images import list_images  # noqa: E402
from llmcxr_jax.vqgan import losses, train  # noqa: E402
from llmcxr_jax.vqgan.input_pipeline import image_batches  # noqa: E402


def load_factory(spec: str):
    """`package.module:function` -> the function (imported, never evaluated from text)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--clinical-net {spec!r}: expected package.module:function")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="image directory or a text file of paths")
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--preset", default=None, help="VQ-GAN preset (default: phantom-f8, or "
                        "the workdir's config when resuming)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="global batch size")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--clinical-net", default=None, metavar="MODULE:FACTORY")
    parser.add_argument("--no-progress", action="store_true", help="periodic lines, no tqdm bar")
    args = parser.parse_args(argv)

    resumed = train.read_run_config(args.workdir)
    if resumed is not None and args.preset is None:
        vq_config, config = resumed
    else:
        preset = args.preset or "phantom-f8"
        vq_config, config = configs.vqgan_preset(preset), configs.VQGANTrainConfig(vqgan=preset)
    sets = list(args.sets)
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    if args.batch is not None:
        sets.append(f"batch_size={args.batch}")
    vq_config, config = train.apply_overrides(vq_config, config, sets)

    paths = list_images(args.images)
    print(f"{len(paths)} image files from {args.images}")
    batches, bad = image_batches(paths, vq_config.resolution, config.batch_size, seed=config.seed,
                                 read_threads=config.read_threads)
    nets = train.FrozenNets(
        perceptual=(losses.lpips_net(config.lpips_vgg_path, config.lpips_heads_path)
                    if config.perceptual_weight > 0 else None),
        clinical=load_factory(args.clinical_net)() if args.clinical_net else None)
    train.train(vq_config, config, args.workdir, batches, nets=nets, data_iter=batches,
                progress=not args.no_progress, extra_config={"images": str(args.images)})
    print(f"skipped images: {len(bad.reasons)} files ({bad.skips} skips)")
    for path, reason in sorted(bad.reasons.items()):
        print(f"  {path}: {reason}")


if __name__ == "__main__":
    main()
