"""Frozen dataclass configs and named presets.

Every config is a frozen dataclass of plain values, so it serialises to JSON (`to_dict`) and back
(`from_dict`) and can be overridden with `dataclasses.replace`. Presets are looked up by name with
`model_preset`, `vqgan_preset`; an unknown name raises a `KeyError` listing the known ones.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, TypeVar

from llmcxr_jax import tasks

T = TypeVar("T")


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass; tuples become lists."""
    return dataclasses.asdict(cfg)


def parse_value(raw: str, current: Any, key: str) -> Any:
    """A `--set key=raw` value typed after the field's current value: booleans as true/false/1/0,
    tuples as `1,2`, JSON lists or `(1, 2)` (the form `--help` lists defaults in), None-valued
    fields as JSON (else the text)."""
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            inner = raw[1:-1] if raw.startswith(("(", "[")) and raw.endswith((")", "]")) else raw
            return tuple(json.loads(f"[{inner}]"))
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"--set {key}={raw}: expected a value like {current!r}") from None
    if current is None:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def with_override(cfg: T, field: str, raw: str, key: str) -> T:
    """`cfg` (a config dataclass) with `field` set from the `--set key=raw` text: the one override
    mechanism of every entry point. An unknown field is a ValueError naming the known ones."""
    names = [f.name for f in dataclasses.fields(cfg)]
    if field not in names:
        where = key.rpartition(".")[0] or type(cfg).__name__
        raise ValueError(f"unknown --set key {key!r}; {where} keys: {names}")
    return dataclasses.replace(cfg, **{field: parse_value(raw, getattr(cfg, field), key)})


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild `cls` from `to_dict` output; unknown keys raise naming the key and the class."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KeyError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(fields)}")
    # JSON has no tuples; configs are frozen and hashable, so lists come back as tuples.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# --------------------------------------------------------------------------------------------------
# LLM: GPT-NeoX
# --------------------------------------------------------------------------------------------------

DOLLY_TEXT_IDS = 50_280  # GPT-NeoX-20B tokenizer (50,277) + 3 dolly-v2 specials
IMAGE_CODES = 1_024  # VQ-GAN codebook size: image ids follow the text ids


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """GPT-NeoX shape and numerics.

    `vocab_size` is the number of embedding rows (text ids + image ids, padded to a multiple of
    128); ids past `n_text + n_image` are padding and never sampled.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10_000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    initializer_range: float = 0.02
    # Numerics and memory.
    dtype: str = "float32"  # compute dtype: "bfloat16" on TPU/GPU, "float32" on CPU
    param_dtype: str = "float32"  # master weights
    # False: the layer loop is unrolled when traced (same stacked [layers, ...] params, so
    # checkpoints and shardings do not change): longer compiles, no per-layer loop overheads.
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
    # Causal attention without a KV cache runs in blocks of this many query rows, each against
    # the keys up to its last row only, skipping the masked upper triangle (T=512, 128: 5/8 of
    # the dense products); 0 = one dense masked product. Same result either way.
    attention_chunk: int = 128
    # Not GPT-NeoX: a learned [rows, embed] table added to each image token's embedding by its
    # index within its image (the VQ-GAN grid's cell, row-major); 0 = none, as imported models.
    # `image_ids`: the image ids' (first, count). `RunConfig.image_positions` sets both.
    image_position_rows: int = 0
    image_ids: tuple[int, int] = (0, 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.attention_chunk < 0:
            raise ValueError(f"attention_chunk must be >= 0, got {self.attention_chunk}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")


REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


def extended_vocab_rows(n_text: int = DOLLY_TEXT_IDS, n_image: int = IMAGE_CODES) -> int:
    """Embedding rows for text + image ids, padded to a multiple of 128."""
    return round_up(n_text + n_image, 128)


_PYTHIA = dict(max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True)
_EXT = extended_vocab_rows()  # 51,328 rows for the dolly-v2 tokenizer + 1,024 image ids
# The small presets unroll their few layers: compiles stay short, and XLA:CPU spends a measurable
# part of the train step on the layer scan's per-layer slicing and stacking (README, Performance).
_UNROLLED = dict(scan_layers=False)

MODEL_PRESETS: dict[str, ModelConfig] = {
    # Tests and the phantom world: vocabulary of a small trained BPE (2,048 text ids) + 1,024 codes.
    "tiny": ModelConfig(vocab_size=extended_vocab_rows(2048), hidden_size=128, num_layers=2,
                        num_heads=4, intermediate_size=512, max_position_embeddings=1024,
                        **_UNROLLED),
    "pythia-70m": ModelConfig(vocab_size=_EXT, hidden_size=512, num_layers=6, num_heads=8,
                              intermediate_size=2048, **_PYTHIA, **_UNROLLED),
    "pythia-160m": ModelConfig(vocab_size=_EXT, hidden_size=768, num_layers=12, num_heads=12,
                               intermediate_size=3072, **_PYTHIA, **_UNROLLED),
    "pythia-410m": ModelConfig(vocab_size=_EXT, hidden_size=1024, num_layers=24, num_heads=16,
                               intermediate_size=4096, **_PYTHIA),
    "pythia-1b": ModelConfig(vocab_size=_EXT, hidden_size=2048, num_layers=16, num_heads=8,
                             intermediate_size=8192, **_PYTHIA),
    "dolly-v2-3b": ModelConfig(vocab_size=_EXT, hidden_size=2560, num_layers=32, num_heads=32,
                               intermediate_size=10240, **_PYTHIA),
    "pythia-6.9b": ModelConfig(vocab_size=_EXT, hidden_size=4096, num_layers=32, num_heads=32,
                               intermediate_size=16384, **_PYTHIA),
    "dolly-v2-12b": ModelConfig(vocab_size=_EXT, hidden_size=5120, num_layers=36, num_heads=40,
                                intermediate_size=20480, **_PYTHIA),
}
MODEL_PRESETS["pythia-2.8b"] = MODEL_PRESETS["dolly-v2-3b"]


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named GPT-NeoX preset, with field overrides."""
    if name not in MODEL_PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **overrides)


# --------------------------------------------------------------------------------------------------
# LLM training (optimizer, schedule, step)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the LLM. Defaults are the paper's: AdamW lr 5e-6, warmup 50, batch 16."""

    learning_rate: float = 5e-6
    warmup_steps: int = 50
    schedule: str = "constant"  # constant | cosine (after warmup)
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of learning_rate
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables
    # The shape of a step, the data pipeline's too (`data.pipeline.build_pipeline`): rows over
    # all hosts, and tokens per row (longer examples are dropped and counted, never cut).
    global_batch: int = 16
    seq_len: int = 1024
    grad_accum_steps: int = 1  # micro-batches per step, accumulated inside the jitted step
    # Also the step's shape: the most tokens with loss in one row (0, or seq_len and more: no
    # limit). The train step then runs the vocabulary projection and its softmax at these many
    # slots per row instead of all seq_len (the same loss and gradients), and the pipeline packs
    # rows so that none holds more (an example with more on its own is dropped and counted).
    loss_positions: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule {self.schedule!r} not in ('constant', 'cosine')")
        if self.seq_len < 2 or self.global_batch < 1:
            raise ValueError(f"seq_len {self.seq_len} must be >= 2 and global_batch "
                             f"{self.global_batch} >= 1")
        if self.loss_positions < 0:
            raise ValueError(f"loss_positions {self.loss_positions} must be >= 0 (0: every slot)")
        if self.global_batch % self.grad_accum_steps:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by "
                             f"grad_accum_steps {self.grad_accum_steps}")

    @property
    def logit_slots(self) -> int:
        """`loss_positions` where it limits a row (below seq_len), else 0: every slot."""
        return self.loss_positions if self.loss_positions < self.seq_len else 0


# --------------------------------------------------------------------------------------------------
# VQ-GAN (taming-transformers' VQModel)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """taming-transformers' `ddconfig` + quantizer settings."""

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    z_channels: int = 256
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 1024
    beta: float = 0.25
    legacy: bool = True  # taming's VectorQuantizer2 default: beta on the codebook term
    norm_groups: int = 32  # taming's Normalize; every level's channels must split into them
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        # Checked here rather than when the model is built, which a run reaches only after its
        # world, tokenizer and clinical classifier.
        widths = sorted({self.ch * m for m in (1, *self.ch_mult)})
        uneven = [w for w in widths if self.norm_groups < 1 or w % self.norm_groups]
        if uneven:
            raise ValueError(f"norm_groups {self.norm_groups} must divide the channels of every "
                             f"level (ch {self.ch} x ch_mult {self.ch_mult}: {widths}); "
                             f"{uneven} do not")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2


VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # The paper's VQ-GAN: 256 px, f16, 16x16 = 256 tokens, 1,024 codes.
    "taming-f16-1024": VQGANConfig(),
    # The phantom world: 128 px, f8, still 16x16 = 256 tokens per image.
    "phantom-f8": VQGANConfig(resolution=128, ch=64, ch_mult=(1, 1, 2, 4), num_res_blocks=1,
                              attn_resolutions=(16,), z_channels=64, embed_dim=64),
    # The phantom default on a CPU: 64 px, f4, 16x16 = 256 tokens, 1,024 codes. Channels
    # 32/64/64 and no attention: cheaper per step on a CPU than (1, 2, 4) with attention at 16
    # (README, Performance).
    "phantom-f4": VQGANConfig(resolution=64, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                              attn_resolutions=(), z_channels=64, embed_dim=64),
    # A coarser phantom grid: 64 px, f8, 8x8 = 64 tokens of 1,024 codes (a quarter of the LLM
    # tokens per image of phantom-f4).
    "phantom-f8-64": VQGANConfig(resolution=64, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                                 attn_resolutions=(), z_channels=64, embed_dim=64),
    # The same 8x8 = 64 tokens from 128 px images (f16), the world's own resolution. Not the
    # default: it raised image -> report F1 on two world seeds but cost 40 % more time, and the
    # findings the 64 px grid loses (pneumothorax, lung lesion) stayed lost (README).
    # Channels 16/32/64/64/128 (the three coarsest levels are phantom-f8-64's), so GroupNorm
    # has 16 groups rather than taming's 32.
    "phantom-f16-64": VQGANConfig(resolution=128, ch=16, ch_mult=(1, 2, 4, 4, 8),
                                  num_res_blocks=1, attn_resolutions=(), z_channels=64,
                                  embed_dim=64, norm_groups=16),
    # Unit tests: 32 px, f4, 8x8 = 64 tokens, 128 codes.
    "test-tiny": VQGANConfig(resolution=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                             attn_resolutions=(8,), z_channels=32, embed_dim=32, n_embed=128),
}


def vqgan_preset(name: str, **overrides: Any) -> VQGANConfig:
    """The named VQ-GAN preset, with field overrides."""
    if name not in VQGAN_PRESETS:
        raise KeyError(f"unknown vqgan preset {name!r}; known: {sorted(VQGAN_PRESETS)}")
    return dataclasses.replace(VQGAN_PRESETS[name], **overrides)


# --------------------------------------------------------------------------------------------------
# VQ-GAN training (taming's VQLPIPSWithDiscriminator + the paper's clinical feature loss)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig:
    """GAN training of the VQ-GAN (`llmcxr_jax/vqgan/train.py`). Defaults follow taming's
    custom_vqgan.yaml (disc_start 10k, disc_weight 0.8, codebook/perceptual weight 1, base lr
    4.5e-6 scaled by the global batch) plus the paper's clinical loss (x100, off without a net)."""

    vqgan: str = "phantom-f8"  # VQ-GAN preset; model overrides go to the resolved VQGANConfig
    steps: int = 50_000
    batch_size: int = 8  # global batch
    base_lr: float = 4.5e-6
    learning_rate: float = 0.0  # 0: base_lr * batch_size (taming's main.py scaling)
    adam_b1: float = 0.5
    adam_b2: float = 0.9
    pixel_weight: float = 1.0  # L1 (taming defines pixelloss_weight but never applies it: 1)
    perceptual_weight: float = 1.0  # LPIPS; forced to 0 (with a message) without VGG16 weights
    codebook_weight: float = 1.0
    clinical_weight: float = 100.0  # the paper's feature L2; used only when a feature net is given
    disc_start: int = 10_000
    disc_weight: float = 0.8
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_layers: int = 3
    disc_ndf: int = 64
    lpips_vgg_path: str = ""  # torchvision vgg16 state dict (.pth / .safetensors / .npz)
    lpips_heads_path: str = ""  # "" = the lpips wheel's weights/v0.1/vgg.pth
    dead_code_window: int = 200  # a code unused for this many steps counts as dead
    dead_code_restart: bool = False  # re-seed dead codes from this batch's encoder outputs
    dead_code_restart_every: int = 200
    mesh_data: int = 1  # devices on the data axis; -1 = the most that divide batch_size
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    read_threads: int = 0  # grain ReadOptions(num_threads); 0 = decode in the main thread

    @property
    def lr(self) -> float:
        return self.learning_rate or self.base_lr * self.batch_size

    def __post_init__(self) -> None:
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss {self.disc_loss!r} not in ('hinge', 'vanilla')")
        if self.batch_size < 1 or self.steps < 0:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1 and steps {self.steps} >= 0")
        if self.dead_code_window < 1 or self.dead_code_restart_every < 1:
            raise ValueError("dead_code_window and dead_code_restart_every must be >= 1")


# --------------------------------------------------------------------------------------------------
# Data pipeline (llmcxr_jax/data/pipeline.py)
# --------------------------------------------------------------------------------------------------

DATA_TASKS = tasks.NAMES  # the data order of `DataConfig.weights`


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Sources, task mix, tokenisation, packing and batching of the LLM training data.

    `weights` are the mixing weights of `DATA_TASKS` in that order (report -> image, image ->
    report, text instructions, VQA); a zero weight leaves the task out. Paths: `world` is a
    MIMIC-CXR-JPG-layout root (CSVs + reports), `codes` the VQ-GAN encode step's output,
    `instructions` a dolly-15k-format JSONL, `vqa` a VQA JSONL. The rows per step and tokens per
    row are the step's (`TrainConfig.global_batch`, `TrainConfig.seq_len`), given to the pipeline
    with this config.
    """

    world: str = ""
    codes: str = ""
    instructions: str = ""
    vqa: str = ""
    stage: int = 1  # 1: every pair, FINDINGS + IMPRESSION; 2: frontal earliest study, IMPRESSION
    splits: tuple[str, ...] = ("train",)
    weights: tuple[float, ...] = (0.4, 0.4, 0.2, 0.0)
    direction: str = "alternate"  # alternate (the original: one direction per pair) | both
    packing: bool = True  # several examples per row (segment ids); False: one example per row
    packing_bins: int = 0  # first-fit bins per packing round; 0 = 4 x the per-host batch
    tokens_per_image: int = 256
    codebook_size: int = 1024
    # Loss weight of an image-code response token relative to a text token. A report -> image
    # response is tokens_per_image codes against a few dozen report tokens the other way, so at
    # 1.0 the codes' unconditional statistics dominate the gradient.
    image_loss_weight: float = 1.0
    # Classifier-free guidance: the fraction of report -> image examples whose report is replaced
    # by `prompts.NULL_REPORT`, so the model also learns the unconditional image distribution
    # that guided generation (`--guidance`) contrasts with. 0 = every example conditioned.
    null_report_rate: float = 0.0
    # A source (CSV, report folder, image codes, JSONL) with more than this fraction of bad,
    # skipped records stops the run before training: a wrong delimiter or folder, not noise.
    max_skip_fraction: float = 0.05
    seed: int = 0
    read_threads: int = 0  # grain ReadOptions.num_threads (0 measured fastest for this pipeline)
    prefetch_buffer: int = 64  # grain ReadOptions.prefetch_buffer_size (used with threads > 0)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"data stage must be 1 or 2, got {self.stage}")
        if len(self.weights) != len(DATA_TASKS) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights {self.weights} must be {len(DATA_TASKS)} non-negative numbers "
                             f"({', '.join(DATA_TASKS)}) with a positive sum")
        if self.direction not in ("alternate", "both"):
            raise ValueError(f"direction {self.direction!r} not in ('alternate', 'both')")
        if self.image_loss_weight <= 0:
            raise ValueError(f"image_loss_weight must be > 0, got {self.image_loss_weight}")
        if not 0.0 <= self.null_report_rate < 1.0:
            raise ValueError(f"null_report_rate must be in [0, 1), got {self.null_report_rate}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")

    def task_weights(self) -> dict[str, float]:
        """Normalised weights of the tasks that take part (weight > 0)."""
        total = sum(self.weights)
        return {t: w / total for t, w in zip(DATA_TASKS, self.weights) if w > 0}


DATA_PRESETS: dict[str, DataConfig] = {
    # The mission's mix: report -> image 40 %, image -> report 40 %, text instructions 20 %.
    "stage1": DataConfig(stage=1),
    "stage2": DataConfig(stage=2),
    # The paper's later recipe with CXR-VQA (30/30/20/20 in stage 1); stage 2 keeps the mix.
    "stage1-vqa": DataConfig(stage=1, weights=(0.3, 0.3, 0.2, 0.2)),
    "stage2-vqa": DataConfig(stage=2, weights=(0.3, 0.3, 0.2, 0.2)),
}


def data_preset(name: str, **overrides: Any) -> DataConfig:
    """The named data preset, with field overrides."""
    if name not in DATA_PRESETS:
        raise KeyError(f"unknown data preset {name!r}; known: {sorted(DATA_PRESETS)}")
    return dataclasses.replace(DATA_PRESETS[name], **overrides)
