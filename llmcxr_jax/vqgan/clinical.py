"""The network behind the VQ-GAN's clinical feature loss in a run (`launch/train.py`): its config,
the run step that trains it (WORKDIR/clinical/), and loading it as the loss's `FeatureNet`.

The paper's VQ-GAN adds the squared distance between a CXR classifier's pooled features of each
input and of its reconstruction (`losses.clinical_feature_loss`), so that what a classifier reads
in an image survives tokenisation. Here that classifier is a phantom findings classifier
(`eval/classifier.py`) trained at the VQ-GAN's resolution on the world's train split only: no
validation or test image is read, neither to train nor to tune it.

It is deliberately another network than the evaluation's instrument: `launch/evaluate.py` trains
its own classifier in WORKDIR/classifier (seed 0, widths 24-48-96-192), and this one has other
widths and another seed. A VQ-GAN trained against a network's features can please that network
without keeping the findings, so the evaluation must never score the VQ-GAN with the network it
was trained against: a config that would rebuild the evaluation's network is refused, and so are
the evaluation's classifier as the clinical net and the clinical net as the evaluation's
(`same_network`: one folder, a copy or a retrain).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.eval import train_classifier as train_clf
from llmcxr_jax.vqgan.losses import FeatureNet

TRAIN = "train"  # `ClinicalNetConfig.net`: train the classifier inside the run
NAME_PREFIX = "classifier:"  # a FeatureNet's name: NAME_PREFIX + its folder


@dataclasses.dataclass(frozen=True)
class ClinicalNetConfig:
    """The clinical loss's classifier (`--set clinical.<field>=...`); its weight is
    `vqgan.clinical_weight`. `net`: "" = no clinical loss (and no step); "train" = train it in
    WORKDIR/clinical/ before the VQ-GAN; else a classifier directory (`eval/classifier.py`
    format, e.g. a `launch/train_classifier.py` output: real-data users bring their own). The
    other fields are the training of "train": the measured recipe (a 64 px world, 900 steps)."""

    net: str = ""
    steps: int = 900
    widths: tuple[int, ...] = (32, 64, 128, 128)  # the evaluation's: (24, 48, 96, 192)
    seed: int = 1  # the evaluation's: 0
    batch_size: int = 16
    learning_rate: float = 3e-3

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"clinical.steps ({self.steps}) and clinical.batch_size "
                             f"({self.batch_size}) must be >= 1")
        try:
            self.classifier_config(clf.ClassifierConfig().image_size)
        except ValueError as err:
            raise ValueError(f"clinical.widths {list(self.widths)}: {err}") from None
        evaluation = (clf.ClassifierConfig().widths, train_clf.TrainClassifierConfig().seed)
        if (tuple(self.widths), self.seed) == evaluation:
            raise ValueError(f"clinical.widths {list(self.widths)} and clinical.seed {self.seed} "
                             f"are the evaluation classifier's: the VQ-GAN must not be trained "
                             f"against the network that scores it; change either")

    @property
    def trains_here(self) -> bool:
        return self.net == TRAIN

    def classifier_config(self, image_size: int) -> clf.ClassifierConfig:
        return clf.ClassifierConfig(widths=tuple(self.widths), image_size=image_size)

    def train_config(self) -> train_clf.TrainClassifierConfig:
        return train_clf.TrainClassifierConfig(steps=self.steps, batch_size=self.batch_size,
                                               learning_rate=self.learning_rate, seed=self.seed,
                                               eval_every=0)


def train_net(cfg: ClinicalNetConfig, world: str | pathlib.Path, directory: str | pathlib.Path,
              image_size: int, *, progress: bool = True, log: Callable[[str], None] = print,
              stop: Callable[[], bool] | None = None) -> bool:
    """Train the classifier on `world`'s train split alone (no validation or test split is
    read) into `directory` (`eval/classifier.py` format; the config is written last). False when
    `stop()` (asked after each step) ended it first: then no classifier is saved."""
    return train_clf.train(world, directory, cfg.classifier_config(image_size),
                           cfg.train_config(), train_split="train", eval_split=None,
                           test_split=None, progress=progress, log=log, stop=stop) is not None


def is_complete(directory: str | pathlib.Path) -> bool:
    """Whether `directory` holds a whole classifier (params, then config, written atomically)."""
    directory = pathlib.Path(directory)
    return (directory / clf.CONFIG_FILE).is_file() and (directory / clf.PARAMS_FILE).is_file()


def feature_net(directory: str | pathlib.Path) -> FeatureNet:
    """The classifier in `directory` as the clinical loss's frozen feature extractor."""
    features, params, _ = clf.load_feature_net(directory)
    return FeatureNet(name=f"{NAME_PREFIX}{directory}", features=features, params=params)


def _recipe(directory: pathlib.Path) -> tuple[Any, Any] | None:
    """(classifier config, training seed) from a classifier's train_config.json, if readable."""
    try:
        record = json.loads((directory / train_clf.TRAIN_CONFIG_FILE).read_text())
        return record["classifier"], record["train"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def same_network(a: str | pathlib.Path, b: str | pathlib.Path) -> bool:
    """Whether classifier folders `a` and `b` are one network: the same folder, or the same
    architecture and training seed in their train_config.json (a copy, or a retrain of it)."""
    a, b = pathlib.Path(a), pathlib.Path(b)
    if a.resolve() == b.resolve():
        return True
    recipe = _recipe(a)
    return recipe is not None and recipe == _recipe(b)


def nets_trained_against(run_clinical: pathlib.Path, vqgan_dir: pathlib.Path | None
                         ) -> list[pathlib.Path]:
    """The classifier folders a run's VQ-GAN may have been trained against: the run's own
    (`run_clinical`, WORKDIR/clinical) and the one its training config names
    (`vqgan_dir`/../config.json "clinical", as `feature_net` names it)."""
    nets = [run_clinical]
    if vqgan_dir is not None:
        try:
            name = json.loads((pathlib.Path(vqgan_dir).parent / "config.json").read_text()
                              ).get("clinical")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name.startswith(NAME_PREFIX):
            nets.append(pathlib.Path(name[len(NAME_PREFIX):]))
    return [n for n in nets if n.exists()]
