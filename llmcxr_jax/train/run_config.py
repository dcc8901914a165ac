"""The whole run's configuration: named presets and `--set section.field=value` overrides.

A `RunConfig` nests the frozen configs of every step (world, VQ-GAN training, model, optimizer,
data, the two stages' loops), so one JSON file (`WORKDIR/config.json`) describes a run and a run
can be resumed from its workdir alone.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from llmcxr_jax import configs, tasks
from llmcxr_jax.configs import DataConfig, ModelConfig, TrainConfig, VQGANConfig, VQGANTrainConfig
from llmcxr_jax.data.phantom_world import WorldConfig
from llmcxr_jax.train.loop import LoopConfig
from llmcxr_jax.vqgan.clinical import ClinicalNetConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `launch/train.py` does, in order: world -> tokenizer -> [the clinical loss's
    classifier] -> VQ-GAN -> codes -> stage 1 -> stage 2 -> samples. Paths left empty are
    produced inside the workdir."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig  # stage 1's data; stage 2 uses `stage2_weights` and IMPRESSION-only reports
    stage1: LoopConfig
    stage2: LoopConfig
    world: WorldConfig | None = WorldConfig(n_studies=800, size=128, seed=0)  # None: real data
    vqgan: VQGANTrainConfig = VQGANTrainConfig()
    # The classifier of the VQ-GAN's clinical feature loss (weight vqgan.clinical_weight): none
    # by default; `--set clinical.net=train` trains one in WORKDIR/clinical/ (vqgan/clinical.py).
    # Only a VQ-GAN trained here uses it (not one given by vqgan_dir).
    clinical: ClinicalNetConfig = ClinicalNetConfig()
    stage2_weights: tuple[float, ...] = (0.4, 0.4, 0.2, 0.0)
    mesh: str = "-1"  # all devices on fsdp unless a preset or --mesh says otherwise
    param_sharding: str = "fsdp"  # "data+fsdp": ZeRO-3, state split over data x fsdp too
    # "" = with init_from, the imported LLM's own tokenizer (a given one must equal it); else a
    # byte-level BPE trained on the world's text (vocab_text_ids ids)
    tokenizer: str = ""
    vocab_text_ids: int = 2048
    vqgan_dir: str = ""  # "" = train the VQ-GAN here; else a save_vqgan / import_taming dir
    init_from: str = ""  # "" = random init; else an LLM workdir (launch/import_hf.py output)
    # Without init_from: steps of text-only training on the world's instructions (stage 0, the
    # role dolly-v2 plays for LLM-CXR) before stage 1; saved to WORKDIR/base/, the "before" model
    # of the language-retention evaluation. 0 = stage 1 starts from random weights.
    base_steps: int = 0
    samples: int = 4  # reports and images generated at the end as a quick look
    # Classifier-free guidance scale S of report -> image generation with this run's model, the
    # default of launch/generate.py and launch/evaluate.py (`--guidance`); 1 = plain sampling.
    # S > 1 contrasts with the unconditional branch trained at data.null_report_rate > 0.
    guidance: float = 1.0
    # Sampling temperature of report -> image codes with this run's model, the default of
    # launch/generate.py (`--temperature`), launch/evaluate.py (`--image-temperature`) and the
    # demo; 1 = the model's own distribution (the original's).
    image_temperature: float = 1.0
    # How stage 1 starts the image ids' embedding rows (and output columns): "random" (as the
    # rest of the model, or as imported), or "codebook": from the VQ-GAN's codebook vectors
    # (llm/image_embeddings.py), so that codes that look alike start alike.
    image_embeddings: str = "random"
    # How an image token knows its cell of the VQ-GAN grid: "none" (GPT-NeoX: rotary distances
    # only, while the image's start moves with the prompt's length), or "learned": a table of
    # tokens_per_image rows added to image tokens' embeddings by their index within the image
    # (`ModelConfig.image_position_rows`; not exportable to transformers). Needs the run's own
    # tokenizer (its image ids follow its vocab_text_ids text ids).
    image_positions: str = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.guidance < float("inf"):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if not 0.0 < self.image_temperature < float("inf"):
            raise ValueError(f"image_temperature must be a finite number > 0, got "
                             f"{self.image_temperature}")
        if self.image_embeddings not in IMAGE_EMBEDDINGS:
            raise ValueError(f"image_embeddings {self.image_embeddings!r} not in "
                             f"{IMAGE_EMBEDDINGS}")
        if self.image_positions not in IMAGE_POSITIONS:
            raise ValueError(f"image_positions {self.image_positions!r} not in {IMAGE_POSITIONS}")
        if self.image_positions != "none" and (self.tokenizer or self.init_from):
            raise ValueError("image_positions='learned' needs the run's own tokenizer (tokenizer "
                             "and init_from empty): an imported GPT-NeoX has no such table")


IMAGE_EMBEDDINGS = ("random", "codebook")
IMAGE_POSITIONS = ("none", "learned")


# Fields that follow others, with where each comes from: `resolve` computes them, and `--set` on
# one is an error naming that source (a value set there would be overwritten, or disagree). The
# data's batch and row length are no fields: the step's shape (`train`) is given to the pipeline;
# their keys stay here so that `--set` names their one home.
DERIVED = {
    "data.global_batch": "train.global_batch",
    "data.seq_len": "train.seq_len",
    "data.tokens_per_image": "the VQ-GAN (vqgan.vqgan, or the one in vqgan_dir)",
    "data.codebook_size": "the VQ-GAN (vqgan.vqgan, or the one in vqgan_dir)",
    "data.stage": "the stage (stage_data: 1 = FINDINGS + IMPRESSION, 2 = IMPRESSION)",
    "train.total_steps": "each stage's length (base_steps, stage1.steps, stage2.steps)",
    "model.image_position_rows": "image_positions and the VQ-GAN's tokens per image",
    "model.image_ids": "image_positions, vocab_text_ids and the VQ-GAN's codebook",
}
# Derived only while the run trains its own BPE (`tokenizer` empty).
VOCAB_SIZE_KEY = "model.vocab_size"
VOCAB_SIZE_SOURCE = "vocab_text_ids + the VQ-GAN's codebook (padded to 128) when tokenizer is empty"

_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "stage1": LoopConfig,
             "stage2": LoopConfig, "world": WorldConfig, "vqgan": VQGANTrainConfig,
             "clinical": ClinicalNetConfig}
_TOP_LEVEL = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS)


NO_DISCRIMINATOR = 1_000_000_000  # a disc_start no run reaches: reconstruction losses only


def _phantom(model: str, *, n_studies: int, stage1_steps: int, stage2_steps: int,
             vqgan_steps: int, batch: int, seq_len: int, lr: float, base_steps: int = 0,
             eval_every: int = 0, clinical_net: str = "", image_positions: str = "none"
             ) -> RunConfig:
    train = TrainConfig(learning_rate=lr, warmup_steps=20, schedule="cosine",
                        total_steps=stage1_steps, global_batch=batch, seq_len=seq_len,
                        weight_decay=0.0,
                        # Logits at half a row's slots: the phantom world's rows hold 29-32 % loss
                        # tokens on average and at most 46 % (stages 1 and 2, 1,600 rows of
                        # world seed 0), and the vocabulary projection and its softmax are a
                        # large share of the tiny model's step (`bench/loss_positions.py`).
                        loss_positions=seq_len // 2)
    return RunConfig(
        model=configs.model_preset(model),
        train=train,
        # Both directions of every pair (the original alternates one per pair): twice the pairs
        # per pass for the price of drawing them once. 10 % of report -> image examples carry
        # the null report, so guidance (`guidance`) has an unconditional branch to contrast with.
        data=DataConfig(weights=(0.4, 0.4, 0.2, 0.0), direction="both", null_report_rate=0.1),
        stage1=LoopConfig(steps=stage1_steps, log_every=10, eval_every=eval_every,
                          eval_batches=2, checkpoint_every=100, keep_checkpoints=2),
        stage2=LoopConfig(steps=stage2_steps, log_every=10, eval_every=eval_every,
                          eval_batches=2, checkpoint_every=100, keep_checkpoints=2),
        # A test split of 35 % (about 850 frontal images at the default's 2,400 studies) keeps
        # the bootstrap interval of the evaluation's macro AUROC near +-0.02.
        world=WorldConfig(n_studies=n_studies, size=128, seed=0, n_instructions=2000,
                          split_fractions=(0.55, 0.10, 0.35)),
        # Reconstruction + codebook losses only (disc_start past the end: on 2 CPU cores the
        # budget goes to more reconstruction steps); early, frequent dead-code restarts keep
        # the 1,024 codes in use. `--set vqgan.disc_start=N` turns the GAN phase on.
        # 8x8 = 64 codes per image: a quarter of phantom-f4's tokens per image, so each LLM step
        # holds about three times the image-report pairs. The classifier scored its
        # reconstructions of the test images at 0.58 macro AUROC after 150 steps and 0.74 after
        # 600 (same world) without the clinical feature loss, 0.81 after 300 with it.
        # The clinical feature loss (a classifier's features of input vs reconstruction) is on
        # with `clinical_net="train"` (`--set clinical.net=train`): a classifier trained on the
        # train split first (vqgan/clinical.py). Its weight is 1: the paper's 100 swamps the L1
        # here (README).
        vqgan=VQGANTrainConfig(vqgan="phantom-f8-64", steps=vqgan_steps, batch_size=8,
                               learning_rate=4e-4, disc_start=NO_DISCRIMINATOR,
                               perceptual_weight=0.0, clinical_weight=1.0, log_every=25,
                               dead_code_restart=True, dead_code_window=20,
                               dead_code_restart_every=25,
                               checkpoint_every=max(vqgan_steps // 2, 1), mesh_data=-1),
        clinical=ClinicalNetConfig(net=clinical_net),
        base_steps=base_steps,
        image_embeddings="codebook",
        image_positions=image_positions,
        # Two world seeds, S in {1, 2, 3, 5}: S = 2 raised report -> image AUROC and F1 in both
        # (FID 1.6-1.9x that at S = 1, within 2x the reconstructions'); S >= 3 gained nothing
        # more and raised FID further (README).
        guidance=2.0,
        # Codes drawn at temperature 0.5 rather than 1: on the default's three world seeds and
        # two more training seeds (the same trained models and keys), macro AUROC rose by
        # 0.02-0.04 at S = 2, FID within 2x the reconstructions' (README).
        image_temperature=0.5,
    )


RUN_PRESETS: dict[str, RunConfig] = {
    # The embedded default: the phantom world from nothing, on a laptop-class CPU. The VQ-GAN
    # trains 300 steps with the clinical feature loss (its classifier first), and image tokens
    # know their grid cell (`image_positions`): each raised the held-out conditioning gaps and
    # both directions' scores on world seed 0. 2,400 studies rather than 1,200 (the same steps,
    # so each pair is seen half as often) raised image -> report F1 on world seeds 0 and 1 and
    # report -> image AUROC on seed 1 (README, "What the default learns"). Stage 2 runs 400
    # steps rather than 200 (about 70 s more): from the same stage-1 models of world seeds 0, 1
    # and 2, image -> report F1 rose on all three and report -> image AUROC on two; 600 steps
    # fell back on seed 0 (README).
    "phantom": _phantom("tiny", n_studies=2400, stage1_steps=800, stage2_steps=400,
                        vqgan_steps=300, batch=8, seq_len=512, lr=3e-3, base_steps=300,
                        eval_every=200, clinical_net="train", image_positions="learned"),
    # What more compute buys: the default with 1.25x the studies, 4x stage 1's steps, twice the
    # base model's and the VQ-GAN's, nothing else changed (stage 2's 400 steps were twice the
    # default's when it was measured); meant to take at most an hour on 2 cores (README, "The
    # paper's own checks").
    "phantom-long": _phantom("tiny", n_studies=3000, stage1_steps=3200, stage2_steps=400,
                             vqgan_steps=600, batch=8, seq_len=512, lr=3e-3, base_steps=600,
                             eval_every=200, clinical_net="train", image_positions="learned"),
    # A smoke run on a 16-device simulated mesh (`--mesh=4x4`): the global batch splits 16 ways.
    "tiny": _phantom("tiny", n_studies=120, stage1_steps=20, stage2_steps=10, vqgan_steps=20,
                     batch=16, seq_len=512, lr=1e-3),
}
RUN_PRESETS["dolly-v2-3b"] = dataclasses.replace(
    # The paper's recipe on real MIMIC-CXR-JPG: import dolly-v2-3b (launch/import_hf.py) and the
    # LLM-CXR VQ-GAN (launch/import_taming.py), encode the images (launch/encode_images.py), then
    # point data.world / data.codes / data.instructions at the data (`--set`); README, "The
    # paper's recipe". The vocabulary is the imported model's own. init_from is not the run's
    # default workdir (workdir/dolly-v2-3b), which would overwrite the import. bf16 compute, fp32
    # master weights, full remat.
    RUN_PRESETS["phantom"],
    model=configs.model_preset("dolly-v2-3b", dtype="bfloat16", remat_policy="full"),
    train=TrainConfig(learning_rate=5e-6, warmup_steps=50, schedule="constant",
                      total_steps=10_000, global_batch=16, seq_len=1024),
    data=DataConfig(),
    stage1=LoopConfig(steps=10_000, log_every=10, eval_every=500, eval_batches=8,
                      checkpoint_every=500, keep_checkpoints=3),
    stage2=LoopConfig(steps=2_000, log_every=10, eval_every=250, eval_batches=8,
                      checkpoint_every=250, keep_checkpoints=3),
    world=None, mesh="4x4", param_sharding="data+fsdp", tokenizer="", vocab_text_ids=50_280,
    init_from="workdir/dolly-v2-3b-import", vqgan_dir="workdir/llmcxr-vqgan", base_steps=0,
    # The paper's recipe as published: new image rows start at random, no image-position table
    # (GPT-NeoX as imported), plain sampling; its VQ-GAN is imported, so no clinical step.
    image_embeddings="random", image_positions="none", clinical=ClinicalNetConfig(),
    guidance=1.0, image_temperature=1.0)


def run_preset(name: str) -> RunConfig:
    if name not in RUN_PRESETS:
        raise KeyError(f"unknown --config {name!r}; known presets: {sorted(RUN_PRESETS)}")
    return RUN_PRESETS[name]


def apply_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """`section.field=value` (or a top-level `field=value`) overrides, each checked by name; a
    derived key (`DERIVED`) is refused with the name of what it follows."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        if key in DERIVED:
            raise ValueError(f"--set {key}: derived, not settable: it follows {DERIVED[key]}")
        section, _, field = key.partition(".")
        if not field:
            if section not in _TOP_LEVEL:
                raise ValueError(f"unknown --set key {key!r}; top-level keys: {list(_TOP_LEVEL)}; "
                                 f"sections: {sorted(_SECTIONS)}")
            cfg = configs.with_override(cfg, section, raw, key)
            continue
        if section not in _SECTIONS:
            raise ValueError(f"unknown --set section {section!r} in {key!r}; sections: "
                             f"{sorted(_SECTIONS)}")
        sub = getattr(cfg, section)
        if sub is None:
            raise ValueError(f"--set {key}: this preset has no {section} section")
        cfg = dataclasses.replace(cfg, **{section: configs.with_override(sub, field, raw, key)})
    if VOCAB_SIZE_KEY in keys and not cfg.tokenizer:
        raise ValueError(f"--set {VOCAB_SIZE_KEY}: derived, not settable: it follows "
                         f"{VOCAB_SIZE_SOURCE}")
    return cfg


def resolve(cfg: RunConfig, vqgan: VQGANConfig | None = None) -> RunConfig:
    """The config as it runs, with the `DERIVED` fields computed (none of them can be `--set`):
    the tokens per image and codebook size follow the VQ-GAN (`vqgan`, default: the preset
    trained here); the optimizer's schedule length follows stage 1's steps (`stage_train`: each
    stage's own); and when the run trains its own BPE, the embedding rows follow from its text
    ids + the codebook (padded to 128)."""
    vqgan = vqgan or configs.vqgan_preset(cfg.vqgan.vqgan)
    data = dataclasses.replace(cfg.data, tokens_per_image=vqgan.tokens_per_image,
                               codebook_size=vqgan.n_embed)
    train = dataclasses.replace(cfg.train, total_steps=max(cfg.stage1.steps, 1))
    model = cfg.model
    if not cfg.tokenizer:
        model = dataclasses.replace(model, vocab_size=configs.extended_vocab_rows(
            cfg.vocab_text_ids, vqgan.n_embed))
    if cfg.image_positions == "learned":
        model = dataclasses.replace(model, image_position_rows=vqgan.tokens_per_image,
                                    image_ids=(cfg.vocab_text_ids, vqgan.n_embed))
    return dataclasses.replace(cfg, data=data, train=train, model=model)


def to_json(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


# Keys a config.json from before their one home held (each a copy of its home's value).
RETIRED = {"data": ("global_batch", "seq_len")}


def from_json(text: str) -> RunConfig:
    """A `to_json` config, also one written before a key was retired (`RETIRED`: dropped)."""
    data = json.loads(text)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict) and name in RETIRED:
            value = {k: v for k, v in value.items() if k not in RETIRED[name]}
        if name in _SECTIONS:
            kwargs[name] = None if value is None else configs.from_dict(_SECTIONS[name], value)
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return RunConfig(**kwargs)


def describe_keys() -> str:
    """Every `--set` key with its default in the default preset (for `--help`); derived keys are
    left out (they follow other settings)."""
    cfg = RUN_PRESETS["phantom"]
    lines = [f"{name}={getattr(cfg, name)!r}" for name in _TOP_LEVEL]
    for section in _SECTIONS:
        sub = getattr(cfg, section)
        if sub is not None:
            lines += [f"{section}.{f.name}={getattr(sub, f.name)!r}"
                      + ("  (only with a tokenizer; else derived)"
                         if f"{section}.{f.name}" == VOCAB_SIZE_KEY else "")
                      for f in dataclasses.fields(sub) if f"{section}.{f.name}" not in DERIVED]
    return "\n".join(lines)


def stage_data(cfg: RunConfig, stage: int) -> DataConfig:
    """Stage 0: text instructions only; stage 1: every pair, FINDINGS + IMPRESSION; stage 2: the
    refined subset, IMPRESSION only."""
    if stage == 0:
        return dataclasses.replace(cfg.data, weights=tasks.mix(instruct=1.0))
    if stage == 1:
        return cfg.data
    return dataclasses.replace(cfg.data, stage=2, weights=cfg.stage2_weights)


def stage_loop(cfg: RunConfig, stage: int) -> LoopConfig:
    """Stage 0 (the base model) runs `base_steps` steps with stage 1's logging and checkpoint
    settings, at the unscaled `train.learning_rate` (stage 1's `learning_rate_scale` is stage
    1's own), and no conditioning gap: it sees no image-report pairs."""
    if stage == 0:
        return dataclasses.replace(cfg.stage1, steps=cfg.base_steps, eval_every=0, gap_pairs=0,
                                   learning_rate_scale=1.0)
    return cfg.stage1 if stage == 1 else cfg.stage2


def stage_train(cfg: RunConfig, stage: int) -> TrainConfig:
    """The optimizer settings of one stage: its length, and its peak learning rate scaled by its
    loop's `learning_rate_scale`."""
    loop = stage_loop(cfg, stage)
    return dataclasses.replace(cfg.train, total_steps=max(loop.steps, 1),
                               learning_rate=cfg.train.learning_rate * loop.learning_rate_scale)


def skips_stage1(cfg: RunConfig) -> bool:
    """`stage1.steps=0`: a run without stage 1, the paper's two-stage ablation. Stage 2 (its data
    and `stage2.steps`) starts where stage 1 would have: init_from or the base model (stage 0),
    with the image rows `image_embeddings` gives; `launch/train.py --steps` leaves it at 0."""
    return cfg.stage1.steps == 0


def check_against(cfg: RunConfig, saved: Mapping[str, Any]) -> list[str]:
    """Keys whose value differs from a workdir's saved config (for a clear resume warning)."""
    now = json.loads(to_json(cfg))
    diffs = []
    for section, value in now.items():
        old = saved.get(section)
        if isinstance(value, dict) and isinstance(old, dict):
            diffs += [f"{section}.{k}" for k in value if value[k] != old.get(k)]
        elif value != old:
            diffs.append(section)
    return diffs
