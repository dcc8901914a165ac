"""Where a training run (`launch/train.py --workdir W`) keeps each step's output.

One typed layout that training writes and evaluation, generation, export and the demo read, so a
folder's name lives here only:

    W/config.json      the resolved RunConfig
    W/world/           the phantom world (unless data.world names a real one)
    W/tokenizer/       the BPE trained on the world's text (unless the run uses a given one)
    W/clinical/        the classifier of the VQ-GAN's clinical loss (with clinical.net=train)
    W/vqgan_run/       VQ-GAN training; the model itself in vqgan_run/vqgan/
    W/codes/           every image's VQ-GAN codes (unless data.codes names them)
    W/base/            the stage-0 text-only model (the language-retention baseline)
    W/stage0..2/       each LLM stage's checkpoints, metrics and STEP.json
    W/llm/             the final LLM (an LLM workdir)
    W/samples/         a few generated samples
    W/classifier/      the evaluation's CXR classifier
    W/eval/            the evaluation's outputs
"""

from __future__ import annotations

import dataclasses
import pathlib

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The paths of one run workdir (nothing is created or checked here)."""

    root: pathlib.Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", pathlib.Path(self.root))

    @property
    def config(self) -> pathlib.Path:
        return self.root / CONFIG_FILE

    @property
    def world(self) -> pathlib.Path:
        return self.root / "world"

    @property
    def tokenizer(self) -> pathlib.Path:
        return self.root / "tokenizer"

    @property
    def clinical(self) -> pathlib.Path:
        """The classifier trained for the VQ-GAN's clinical feature loss (not the evaluation's
        `classifier`: another network, so the VQ-GAN is never scored by what it trained on)."""
        return self.root / "clinical"

    @property
    def vqgan_run(self) -> pathlib.Path:
        return self.root / "vqgan_run"

    @property
    def vqgan(self) -> pathlib.Path:
        """The VQ-GAN the run trained (`save_vqgan` output inside its training folder)."""
        return self.vqgan_run / "vqgan"

    @property
    def codes(self) -> pathlib.Path:
        return self.root / "codes"

    @property
    def base(self) -> pathlib.Path:
        return self.root / "base"

    def stage(self, k: int) -> pathlib.Path:
        return self.root / f"stage{k}"

    @property
    def llm(self) -> pathlib.Path:
        return self.root / "llm"

    @property
    def samples(self) -> pathlib.Path:
        return self.root / "samples"

    @property
    def classifier(self) -> pathlib.Path:
        return self.root / "classifier"

    @property
    def eval(self) -> pathlib.Path:
        return self.root / "eval"

    def world_for(self, data_world: str) -> pathlib.Path:
        """The data root a run with `data.world = data_world` reads ("" = the phantom world)."""
        return pathlib.Path(data_world) if data_world else self.world

    def codes_for(self, data_codes: str) -> pathlib.Path:
        """The codes a run with `data.codes = data_codes` reads ("" = encoded in the workdir)."""
        return pathlib.Path(data_codes) if data_codes else self.codes

    def present(self) -> list[str]:
        """The layout's files and folders that exist in the workdir, in the order above
        ("config.json", "world/", ...): what a run made, or was given a place for."""
        entries = [self.config, self.world, self.tokenizer, self.clinical, self.vqgan_run,
                   self.codes, self.stage(0), self.base, self.stage(1), self.stage(2), self.llm,
                   self.samples, self.classifier, self.eval]
        return [p.name + ("/" if p.is_dir() else "") for p in entries if p.exists()]

    def is_run(self) -> bool:
        """Whether the folder looks like a training run's (its config and a stage folder)."""
        return self.config.is_file() and any(self.stage(k).exists() for k in (0, 1, 2))
