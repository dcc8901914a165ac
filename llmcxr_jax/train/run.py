"""The whole run in one workdir, each step reusing what is already complete:

    WORKDIR/config.json      the resolved RunConfig (a run resumes from its workdir alone)
    WORKDIR/world/           the phantom world (MIMIC-CXR-JPG layout), unless data.world is given
    WORKDIR/tokenizer/       the vocabulary (trained BPE, or the given tokenizer + specials)
    WORKDIR/clinical/        with clinical.net=train: the classifier of the VQ-GAN's clinical loss
    WORKDIR/vqgan_run/       VQ-GAN training (checkpoints, metrics); the model in vqgan_run/vqgan
    WORKDIR/codes/           the images' VQ-GAN codes
    WORKDIR/stage0/, base/   optional text-only base model (`base_steps`), the "before" model
    WORKDIR/stage1/, stage2/ LLM training stages (checkpoints, metrics.jsonl, tensorboard/,
                             DONE.json)
    WORKDIR/llm/             the final LLM (config, tokenizer, params) for generate/evaluate/export
    WORKDIR/samples/         a few generated reports and images

Each step is skipped when its output is complete (a marker or a finished file written last), so a
second run, or a run resumed after a kill, does not redo finished work. Each step's folder also
holds STEP.json, the settings it was made with (`step_record.py`); `preflight` compares them with
what this run asks before anything is written: a finished step is reused only when they match,
one asked for more steps continues from its last checkpoint, and anything else stops the run
with one line naming the settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np

from llmcxr_jax import configs
from llmcxr_jax.configs import DataConfig, VQGANConfig
from llmcxr_jax.data import images as images_lib
from llmcxr_jax.data import mimic
from llmcxr_jax.data import pipeline as pipeline_lib
from llmcxr_jax.data.phantom_world import write_world
from llmcxr_jax.data.skips import SkipCounter, TooManySkipped
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.io_utils import atomic_write, atomic_write_text
from llmcxr_jax.llm import inference
from llmcxr_jax.llm.image_embeddings import with_codebook_embeddings
from llmcxr_jax.llm.checkpoint import (TOKENIZER_DIR, CheckpointError, load_llm, read_llm_config,
                                       save_llm)
from llmcxr_jax.parallel.mesh import (check_global_batch, is_main_process, mesh_from_flag,
                                      sync_processes)
from llmcxr_jax.parallel.rules import rules_for
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.text.bpe import train_bpe
from llmcxr_jax.text.vocab import TOKENIZER_FILE, Vocab, load_vocab, tokenizer_difference
from llmcxr_jax.train import curves
from llmcxr_jax.train import run_config as rc
from llmcxr_jax.train import step_record
from llmcxr_jax.train.loop import DONE_FILE, StageResult, run_stage
from llmcxr_jax.train.optimizer import learning_rate_schedule
from llmcxr_jax.train.preemption import PreemptionWatcher
from llmcxr_jax.train.state import init_state, param_shardings
from llmcxr_jax.vqgan import checkpoint as vqgan_checkpoint
from llmcxr_jax.vqgan import clinical as clinical_lib
from llmcxr_jax.vqgan import encode as encode_lib
from llmcxr_jax.vqgan import losses
from llmcxr_jax.vqgan import train as vqgan_train
from llmcxr_jax.vqgan.input_pipeline import image_batches

log = logging.getLogger(__name__)
Say = Callable[[str], None]


def write_config(cfg: rc.RunConfig, paths: RunLayout, say: Say) -> None:
    """WORKDIR/config.json (atomically); warn about keys that differ from an earlier run's."""
    path = paths.config
    if path.exists():
        diffs = rc.check_against(cfg, json.loads(path.read_text()))
        if diffs:
            say(f"note: config differs from {path} in {diffs}; each step checked the settings "
                f"it depends on against its {step_record.RECORD_FILE}")
    if is_main_process():
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, rc.to_json(cfg))


def world_dir(cfg: rc.RunConfig, paths: RunLayout, say: Say, plan: "Plan",
              progress: bool = True, watcher: PreemptionWatcher | None = None) -> pathlib.Path:
    """The data root: the given `data.world`, or a phantom world made (once) in the workdir.
    A stop asked of `watcher` while it draws leaves no world (it is written atomically) and
    raises Preempted."""
    if cfg.world is None:
        return pathlib.Path(cfg.data.world)  # preflight checked that it is given
    if plan.decisions["world"].action in ("reuse", "legacy"):
        say(f"world: reusing {paths.world}")
        return paths.world
    say(f"world: drawing {cfg.world.n_studies} phantom studies at {cfg.world.size} px")
    if is_main_process():  # the others wait for it: one world on a shared disk
        summary = write_world(paths.world, cfg.world, progress=progress,
                              stop=watcher.stop_requested if watcher else None)  # atomic
        if summary is None:
            say("world: stopped before it was complete; nothing kept, a rerun draws it again")
        else:
            plan.finish("world")
            say(f"world: {summary.get('images', '?')} images in {paths.world}")
    sync_processes("llmcxr_world")
    check_preempted(watcher)
    return paths.world


def world_texts(root: pathlib.Path) -> list[str]:
    """Reports, instructions and VQA text of a world: the BPE training corpus."""
    texts = [p.read_text() for p in sorted((root / "reports").rglob("*.txt"))]
    for name, fields in (("instructions.jsonl", ("instruction", "context", "response")),
                         ("vqa.jsonl", ("question", "answer"))):
        path = root / name
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                texts.extend(str(record.get(f, "")) for f in fields)
    return texts


class SetupError(ValueError):
    """A run whose flags or files contradict each other (a user's error, not a bug): well-formed
    but it cannot run, so the launcher prints it as one line and exits 1 (llmcxr_jax/cli.py)."""


class Preempted(Exception):
    """A step stopped on a preemption request (SIGTERM, SIGINT) keeping what a rerun needs: a
    checkpoint, or nothing half-written; `run` says so and returns 0."""


def check_preempted(watcher: PreemptionWatcher | None) -> None:
    """Raise Preempted after a step when a stop was asked (on every process alike)."""
    if watcher is not None and watcher.should_stop(0):
        raise Preempted


def vocabulary(cfg: rc.RunConfig, paths: RunLayout, world: pathlib.Path, say: Say) -> Vocab:
    """The run's vocabulary, made once and saved in WORKDIR/tokenizer/: with `init_from`, the
    imported LLM's own (its weights learned that id -> text mapping); else the given tokenizer +
    specials; else a byte-level BPE trained on the world's text."""
    n_image = vqgan_config(cfg).n_embed
    imported = imported_vocab(cfg, n_image) if cfg.init_from else None
    if (paths.tokenizer / TOKENIZER_FILE).exists():
        vocab = Vocab.load(paths.tokenizer)
        if imported is not None:
            check_same_vocab(vocab, f"this workdir's {paths.tokenizer}", cfg.init_from,
                             imported, "use a new --workdir")
        return vocab
    if imported is not None:
        say(f"tokenizer: the imported LLM's own ({imported.n_text} text + {imported.n_image} "
            f"image ids, from {pathlib.Path(cfg.init_from) / TOKENIZER_DIR})")
        vocab = imported
    elif cfg.tokenizer:
        vocab = load_vocab(cfg.tokenizer, n_image=n_image)
    else:
        say(f"tokenizer: training a {cfg.vocab_text_ids}-id byte-level BPE on {world}")
        vocab = train_bpe(world_texts(world), vocab_size=cfg.vocab_text_ids, n_image=n_image)
    if is_main_process():
        vocab.save(paths.tokenizer)
    return vocab


def imported_vocab(cfg: rc.RunConfig, n_image: int) -> Vocab:
    """The `init_from` LLM workdir's vocabulary, checked against the VQ-GAN's codebook size and
    against a given `tokenizer`, which must be the same in content, not only in size."""
    try:
        _, vocab = read_llm_config(cfg.init_from)
    except (CheckpointError, FileNotFoundError) as err:
        raise SetupError(f"init_from: {err}") from None
    if vocab.n_image != n_image:
        raise SetupError(f"init_from {cfg.init_from} has {vocab.n_image} image ids but the VQ-GAN "
                         f"has {n_image} codes: import the LLM again with launch/import_hf.py "
                         f"--n-image {n_image}")
    if cfg.tokenizer:
        try:
            given = load_vocab(cfg.tokenizer, n_image=n_image)
        except (FileNotFoundError, ValueError) as err:
            raise SetupError(f"tokenizer: {err}") from None
        check_same_vocab(given, f"tokenizer {cfg.tokenizer}", cfg.init_from, vocab,
                         "leave tokenizer unset to use the imported one")
    return vocab


def check_same_vocab(vocab: Vocab, name: str, init_from: str, imported: Vocab,
                     remedy: str) -> None:
    """A one-line SetupError naming both sides unless `vocab` is the `init_from` LLM's own."""
    difference = tokenizer_difference(vocab.tokenizer, imported.tokenizer)
    if difference is None and vocab.n_image != imported.n_image:
        difference = f"{vocab.n_image} vs {imported.n_image} image ids"
    if difference is not None:
        raise SetupError(f"{name} differs from the tokenizer of init_from {init_from} "
                         f"({difference}): the imported weights only know their own ids; {remedy}")


# --------------------------------------------------------------------------------------------------
# VQ-GAN and image codes
# --------------------------------------------------------------------------------------------------


def vqgan_config(cfg: rc.RunConfig) -> VQGANConfig:
    """The VQ-GAN's model config: the given checkpoint's, or the preset trained here."""
    if cfg.vqgan_dir:
        return vqgan_checkpoint.load_config(cfg.vqgan_dir)
    return configs.vqgan_preset(cfg.vqgan.vqgan)


def split_images(world: pathlib.Path, splits: tuple[str, ...]) -> list[pathlib.Path]:
    """Image files of the given splits (from the split CSV), sorted by dicom id."""
    rows = mimic.read_split(world, SkipCounter("split csv"))
    return [mimic.image_path(world, r.subject_id, r.study_id, r.dicom_id)
            for r in sorted(rows.values(), key=lambda r: r.dicom_id) if r.split in splits]


def held_out_images(world: pathlib.Path, size: int, n: int = 4) -> np.ndarray | None:
    """The first `n` readable validation-split images (else test-split), for the VQ-GAN's
    reconstructions.png; None if the world has none."""
    images = []
    for path in split_images(world, ("validate",)) + split_images(world, ("test",)):
        try:
            images.append(images_lib.load_image(path, size))
        except images_lib.ImageError:
            continue
        if len(images) == n:
            break
    return np.stack(images) if images else None


def clinical_net(cfg: rc.RunConfig, paths: RunLayout, world: pathlib.Path, say: Say,
                 plan: "Plan", progress: bool = True, watcher: PreemptionWatcher | None = None
                 ) -> losses.FeatureNet | None:
    """The clinical feature loss's frozen classifier for the VQ-GAN about to train: none
    (`clinical.net` empty), the given directory, or one trained (once) in WORKDIR/clinical/ on
    the world's train split at the VQ-GAN's resolution (vqgan/clinical.py: never the
    evaluation's network). A stop asked while it trains drops it (it keeps no checkpoints) and
    raises Preempted."""
    if not cfg.clinical.net:
        return None
    if not cfg.clinical.trains_here:
        say(f"clinical: the VQ-GAN's clinical loss (weight {cfg.vqgan.clinical_weight:g}) reads "
            f"the classifier in {cfg.clinical.net}")
        return clinical_lib.feature_net(cfg.clinical.net)
    directory = paths.clinical
    action = plan.decisions["clinical"].action
    if action in ("reuse", "legacy"):
        say(f"clinical: reusing {directory}")
    else:
        size = vqgan_config(cfg).resolution
        again = " again (it keeps no checkpoints)" if action == "resume" else ""
        say(f"clinical: training{again} the VQ-GAN's clinical-loss classifier (widths "
            f"{'-'.join(map(str, cfg.clinical.widths))}, seed {cfg.clinical.seed}, "
            f"{cfg.clinical.steps} steps, {size} px) on the train split of {world}")
        if is_main_process():  # the others wait for it and read the same file
            plan.start("clinical")
            if clinical_lib.train_net(cfg.clinical, world, directory, size, progress=progress,
                                      log=say, stop=watcher.stop_requested if watcher else None):
                plan.finish("clinical")
            else:
                say("clinical: stopped before the classifier was complete; it keeps no "
                    "checkpoints, so a rerun trains it again")
        sync_processes("llmcxr_clinical")
        check_preempted(watcher)
    return clinical_lib.feature_net(directory)


def vqgan_dir(cfg: rc.RunConfig, paths: RunLayout, world: pathlib.Path, say: Say, plan: "Plan",
              progress: bool = True, watcher: PreemptionWatcher | None = None) -> pathlib.Path:
    """The VQ-GAN to tokenise images with: the given one, or one trained (once) on the world.
    Its data axis takes the most devices that divide its batch (`vqgan.mesh_data=-1`). A stop
    asked of `watcher` saves a checkpoint at the current step and raises Preempted (a rerun
    resumes from it)."""
    if cfg.vqgan_dir:
        return pathlib.Path(cfg.vqgan_dir)
    final = paths.vqgan
    decision = plan.decisions["vqgan"]
    if decision.action in ("reuse", "legacy"):
        say(f"vqgan: reusing {final}")
        return final
    nets = vqgan_train.FrozenNets(clinical=clinical_net(cfg, paths, world, say, plan, progress,
                                                        watcher))
    vq_cfg = vqgan_config(cfg)
    images = split_images(world, ("train",))
    if decision.action == "continue":
        say(f"vqgan: continuing {final} from step {decision.done_steps} to vqgan.steps="
            f"{cfg.vqgan.steps} (its learning rate is constant)")
    else:
        clinical = (f", clinical loss x{cfg.vqgan.clinical_weight:g} ({nets.clinical.name})"
                    if nets.clinical else "")
        say(f"vqgan: training {cfg.vqgan.vqgan} for {cfg.vqgan.steps} steps on {len(images)} "
            f"images{clinical}")
    n_devices = jax.device_count()
    n_data = vqgan_train.data_axis_size(cfg.vqgan.mesh_data, cfg.vqgan.batch_size, n_devices,
                                        prefix="vqgan.")
    if n_data < n_devices:
        say(f"vqgan: data axis on {n_data} of the {n_devices} devices (vqgan.batch_size="
            f"{cfg.vqgan.batch_size} must split evenly; --set vqgan.batch_size="
            f"{math.lcm(cfg.vqgan.batch_size, n_devices)} would use all of them)")
    batches, bad = image_batches(images, vq_cfg.resolution, cfg.vqgan.batch_size,
                                 seed=cfg.vqgan.seed, read_threads=cfg.vqgan.read_threads)
    plan.start("vqgan")
    state = vqgan_train.train(vq_cfg, cfg.vqgan, paths.vqgan_run, batches, nets=nets,
                              data_iter=batches, mesh=vqgan_train.data_mesh(n_data),
                              progress=progress and is_main_process(), log=say,
                              preview=held_out_images(world, vq_cfg.resolution),
                              stop=watcher.should_stop if watcher else None)
    if int(jax.device_get(state.step)) < cfg.vqgan.steps:
        raise Preempted
    plan.finish("vqgan")
    if bad.reasons:
        say(f"vqgan: skipped {len(bad.reasons)} unreadable images")
    return final


def image_codes(cfg: rc.RunConfig, paths: RunLayout, world: pathlib.Path, vq_dir: pathlib.Path,
                say: Say, plan: "Plan", progress: bool = True) -> pathlib.Path:
    """Codes of every image of the world (resumable: images already encoded are skipped; codes
    of an earlier VQ-GAN, e.g. before `vqgan.steps` grew, are replaced)."""
    if cfg.data.codes:
        return pathlib.Path(cfg.data.codes)
    decision = plan.decisions["codes"]
    if decision.action == "redo":
        say(decision.note)
        if is_main_process():
            shutil.rmtree(paths.codes)
    if is_main_process():  # per-image work on process 0's devices; the others wait for it
        images = split_images(world, ("train", "validate", "test"))
        plan.start("codes")
        encode_lib.encode_images(vq_dir, images, paths.codes, progress=progress, log=say)
        plan.finish("codes")
    sync_processes("llmcxr_codes")
    return paths.codes


# --------------------------------------------------------------------------------------------------
# LLM stages
# --------------------------------------------------------------------------------------------------


def training_sources(data: DataConfig, code_table: Any) -> pipeline_lib.Sources:
    """A stage's training records; a source that is mostly bad records (more than
    `data.max_skip_fraction`) stops the run before it trains, in one line (SetupError)."""
    try:
        return pipeline_lib.load_sources(data, code_table)
    except TooManySkipped as err:
        raise SetupError(str(err)) from None


def data_for(cfg: rc.RunConfig, stage: int, world: pathlib.Path, codes: pathlib.Path,
             splits: tuple[str, ...]) -> DataConfig:
    data = rc.stage_data(cfg, stage)
    extra = {}
    if cfg.world is not None:
        extra = {"instructions": str(world / "instructions.jsonl"),
                 "vqa": str(world / "vqa.jsonl") if "vqa" in data.task_weights() else data.vqa}
    return dataclasses.replace(data, world=str(world), codes=str(codes), splits=splits, **extra)


# ModelConfig fields that give imported weights their meaning; the others (dtype, remat, layer
# scan, attention blocks) are how a run computes with them and may differ from the import's.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                       "rotary_pct", "rotary_emb_base", "max_position_embeddings",
                       "layer_norm_eps", "use_parallel_residual", "attention_bias")


def initial_params(cfg: rc.RunConfig, mesh: Any, vocab: Vocab) -> Any:
    """Stage 1's starting params: an imported LLM workdir's (`init_from`), or None (random). The
    run's model must have the imported architecture and the run's vocabulary must be the
    imported one, id for id; either mismatch is a SetupError before anything is restored."""
    if not cfg.init_from:
        return None
    try:
        imported_cfg, imported = read_llm_config(cfg.init_from)
    except (CheckpointError, FileNotFoundError) as err:
        raise SetupError(f"init_from: {err}") from None
    wrong = [f"model.{name}={getattr(imported_cfg, name)}" for name in ARCHITECTURE_FIELDS
             if getattr(cfg.model, name) != getattr(imported_cfg, name)]
    if wrong:
        raise SetupError(f"the run's model differs from init_from {cfg.init_from}'s architecture: "
                         f"set {' '.join('--set ' + w for w in wrong)}")
    check_same_vocab(vocab, "the run's vocabulary", cfg.init_from, imported, "use a new --workdir")
    shardings = param_shardings(cfg.model, mesh, rules_for(cfg.param_sharding))
    return load_llm(cfg.init_from, shardings)[1]


def base_model(cfg: rc.RunConfig, paths: RunLayout, world: pathlib.Path, codes: pathlib.Path,
               code_table: Any, vocab: Vocab, mesh: Any, say: Say,
               watcher: PreemptionWatcher | None, plan: "Plan") -> Any:
    """Stage 0: `base_steps` of text-only training on the world's instructions, from random
    weights; the result is saved once to WORKDIR/base/ (the language-retention baseline) and
    returned as the first LLM stage's starting params. None if preempted."""
    data = data_for(cfg, 0, world, codes, ("train",))
    sources = training_sources(data, code_table)
    say(f"stage 0 (base model, text only): {sources.sizes()} training records")
    result = planned_stage(0, cfg, plan, say, model_cfg=cfg.model, data_cfg=data, mesh=mesh,
                           vocab=vocab, train_sources=sources, eval_sources=None,
                           stage_dir=paths.stage(0), watcher=watcher,
                           rules=rules_for(cfg.param_sharding))
    say(f"stage 0: {result.status} at step {result.step}")
    if result.status == "preempted":
        return None
    if result.status != "reused" or not (paths.base / "config.json").exists():
        save_llm(paths.base, cfg.model, result.params, vocab, step=result.step, overwrite=True)
        say(f"stage 0: base model in {paths.base}")
    return result.params


def with_image_positions(cfg: rc.RunConfig, params: Any, mesh: Any) -> Any:
    """`params` with a freshly initialised image-position table when the model has one and they
    lack it (a base model or an import made without it: a checkpoint restored into this model's
    tree leaves the table abstract); else as given (None: random init)."""
    if (not cfg.model.image_position_rows or params is None
            or isinstance(params.get("image_position"), jax.Array)):
        return params
    fresh = init_state(cfg.model, rc.stage_train(cfg, 1), mesh, rules_for(cfg.param_sharding))
    return {**params, "image_position": fresh.params["image_position"]}


def with_image_embeddings(cfg: rc.RunConfig, params: Any, mesh: Any, vq_dir: pathlib.Path,
                          vocab: Vocab) -> Any:
    """The first LLM stage's starting params (stage 1's; stage 2's when `rc.skips_stage1`) with
    the image ids' rows from the VQ-GAN codebook when `image_embeddings="codebook"` (None: the
    random init `run_stage` would make); else as given."""
    if cfg.image_embeddings != "codebook":
        return params
    if params is None:
        params = init_state(cfg.model, rc.stage_train(cfg, 1), mesh,
                            rules_for(cfg.param_sharding)).params
    _, vq_params = vqgan_checkpoint.load_vqgan(vq_dir)
    codebook = np.asarray(vq_params["quantize"]["embedding"])
    return with_codebook_embeddings(params, cfg.model, codebook, vocab.image_offset,
                                    seed=cfg.train.seed)


def llm_stages(cfg: rc.RunConfig, paths: RunLayout, world: pathlib.Path, codes: pathlib.Path,
               vocab: Vocab, mesh: Any, stages: tuple[int, ...], say: Say,
               watcher: PreemptionWatcher | None, plan: "Plan",
               vq_dir: pathlib.Path) -> StageResult | None:
    """Run the requested stages in order; stage 2 starts from stage 1's final params with a
    fresh optimizer, or without stage 1 (`rc.skips_stage1`) from where stage 1 would start.
    Returns the last stage's result (None if preempted)."""
    if vocab.embed_rows != cfg.model.vocab_size:
        raise ValueError(f"the vocabulary needs {vocab.embed_rows} embedding rows ({vocab.n_text} "
                         f"text + {vocab.n_image} image ids, padded to 128) but model.vocab_size "
                         f"is {cfg.model.vocab_size}: set --set model.vocab_size="
                         f"{vocab.embed_rows} or use a matching tokenizer")
    result: StageResult | None = None
    params = None
    # Each stage loads only what it uses: its data only when it trains, its starting params
    # (init_from, the base model, the codebook rows, stage 1's) only when it has no checkpoint
    # of its own to resume from.
    trains = {k: plan.decisions[f"stage{k}"].action not in ("reuse", "legacy") for k in (1, 2)
              if f"stage{k}" in plan.decisions}
    afresh = {k: trains[k] and _latest_checkpoint(paths.stage(k) / "checkpoints") is None
              for k in trains}
    # Stage 1 runs when asked to train or to give the final model; its finished params are read
    # only when stage 2 starts from them. Without stage 1, stage 2 starts where it would.
    skip1 = rc.skips_stage1(cfg)
    needed = {1: not skip1 and ((1 in stages and (trains[1] or 2 not in stages))
                                or afresh.get(2, False)),
              2: 2 in stages}
    first = 2 if skip1 else 1  # the stage that starts from init_from / the base model
    code_table = (pipeline_lib.flat_codes(str(codes))
                  if any(trains[k] for k in trains if needed[k]) else None)
    for stage in (1, 2):
        if not needed[stage]:
            continue
        train_data = data_for(cfg, stage, world, codes, ("train",))
        train_sources = eval_sources = None
        if trains[stage]:
            train_sources = training_sources(train_data, code_table)
            say(f"stage {stage}: {train_sources.sizes()} training records; "
                f"{train_sources.skips.summary()}")
            try:
                eval_sources = pipeline_lib.load_sources(
                    data_for(cfg, stage, world, codes, ("validate",)), code_table)
            except ValueError as err:  # a tiny world may hold no usable held-out pair
                say(f"stage {stage}: no held-out evaluation ({err})")
        if not afresh[stage]:
            init = None  # reused, or resumed / continued from the stage's own checkpoints
        elif stage == first:
            init = initial_params(cfg, mesh, vocab)
            if init is None and cfg.base_steps > 0:
                init = base_model(cfg, paths, world, codes, code_table, vocab, mesh, say, watcher,
                                  plan)
                if init is None:
                    return None  # preempted in stage 0
            init = with_image_positions(cfg, with_image_embeddings(cfg, init, mesh, vq_dir,
                                                                   vocab), mesh)
        else:
            init = params
        result = planned_stage(stage, cfg, plan, say, model_cfg=cfg.model, data_cfg=train_data,
                               mesh=mesh, vocab=vocab, train_sources=train_sources,
                               eval_sources=eval_sources, stage_dir=paths.stage(stage),
                               init_params=init, watcher=watcher,
                               rules=rules_for(cfg.param_sharding))
        say(f"stage {stage}: {result.status} at step {result.step}")
        if result.status == "preempted":
            return None
        params = result.params
    return result


# --------------------------------------------------------------------------------------------------
# What each step was made with: STEP.json records, checked before any work (train/step_record.py)
# --------------------------------------------------------------------------------------------------

STAGE_LENGTH_KEYS = {0: "base_steps", 1: "stage1.steps", 2: "stage2.steps"}


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """A step as its record sees it: its directory in the workdir (None: given from outside the
    workdir, never recorded), its own settings, the steps whose output it reads, its length key."""

    name: str
    label: str
    directory: pathlib.Path | None
    own: dict[str, Any]
    inputs: tuple[str, ...] = ()
    length_key: str | None = None
    derived: bool = False  # redone (not refused) when what it was made from changed


def uses_base_model(cfg: rc.RunConfig) -> bool:
    return cfg.base_steps > 0 and not cfg.init_from


def step_specs(cfg: rc.RunConfig, paths: RunLayout) -> list[StepSpec]:
    """The run's steps in order, each with the config sections its output depends on, flattened
    to `--set` keys (whole sections: fields added to them later are compared too)."""
    flat = step_record.flatten
    vq_model = {"vqgan_dir": cfg.vqgan_dir} if cfg.vqgan_dir else {"vqgan.vqgan": cfg.vqgan.vqgan}

    def llm(k: int) -> dict[str, Any]:
        data = rc.stage_data(cfg, k) if k == 0 else cfg.data  # stage 0: its fixed text-only mix
        return {**flat("model", cfg.model), **flat("train", rc.stage_train(cfg, k)),
                **flat("data", data), STAGE_LENGTH_KEYS[k]: rc.stage_loop(cfg, k).steps}

    bpe = not cfg.tokenizer and not cfg.init_from
    base = ("stage0",) if uses_base_model(cfg) else ()
    # What the first LLM stage starts from: stage 1's, or stage 2's without stage 1 (then stage
    # 2's record says stage1.steps=0, so a later stage 1 cannot silently slip under it).
    start = {"init_from": cfg.init_from, "image_embeddings": cfg.image_embeddings}
    start_inputs = ("world", "tokenizer", "codes") + base
    stage2_from = ({**start, STAGE_LENGTH_KEYS[1]: 0}, start_inputs) if rc.skips_stage1(cfg) \
        else ({}, ("stage1",))
    # The clinical loss's classifier: trained here (its own step, made from the world at the
    # VQ-GAN's resolution) or given. The VQ-GAN records its weight only when the loss is on
    # (without a classifier the weight changes nothing; records from before this setting keep
    # matching), and `clinical.net` always.
    trains_clinical = cfg.clinical.trains_here and not cfg.vqgan_dir
    vqgan_own = flat("vqgan", cfg.vqgan)
    if not cfg.clinical.net:
        del vqgan_own["vqgan.clinical_weight"]
    return [
        StepSpec("world", "world", None if cfg.world is None else paths.world,
                 {"data.world": cfg.data.world} if cfg.world is None else flat("world", cfg.world)),
        StepSpec("clinical", "clinical", paths.clinical if trains_clinical else None,
                 {**flat("clinical", cfg.clinical), "vqgan.vqgan": cfg.vqgan.vqgan}
                 if trains_clinical else {"clinical.net": cfg.clinical.net},
                 ("world",) if trains_clinical else ()),
        StepSpec("vqgan", "vqgan", None if cfg.vqgan_dir else paths.vqgan_run,
                 vq_model if cfg.vqgan_dir else vqgan_own,
                 ("world",) if cfg.vqgan_dir else ("world", "clinical"), "vqgan.steps"),
        StepSpec("tokenizer", "tokenizer", paths.tokenizer,
                 {**vq_model, "tokenizer": cfg.tokenizer, "vocab_text_ids": cfg.vocab_text_ids,
                  "init_from": cfg.init_from}, ("world",) if bpe else ()),
        StepSpec("codes", "codes", None if cfg.data.codes else paths.codes,
                 {"data.codes": cfg.data.codes}, () if cfg.data.codes else ("vqgan",),
                 derived=True),
        StepSpec("stage0", "stage 0", paths.stage(0), llm(0), ("world", "tokenizer"),
                 STAGE_LENGTH_KEYS[0]),
        StepSpec("stage1", "stage 1", paths.stage(1), {**llm(1), **start}, start_inputs,
                 STAGE_LENGTH_KEYS[1]),
        StepSpec("stage2", "stage 2", paths.stage(2),
                 {**llm(2), "stage2_weights": list(cfg.stage2_weights), **stage2_from[0]},
                 stage2_from[1], STAGE_LENGTH_KEYS[2]),
    ]


def _json_field(path: pathlib.Path, *keys: str) -> Any:
    try:
        value = json.loads(path.read_text())
        for key in keys:
            value = value[key]
        return value
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _latest_checkpoint(directory: pathlib.Path) -> int | None:
    steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()] \
        if directory.is_dir() else []
    return max(steps, default=None)


def _step_state(spec: StepSpec) -> tuple[bool, bool, int | None, int | None]:
    """(finished, started, the length a finished step ran, its latest checkpoint step) from the
    files it leaves (the markers written last)."""
    d = spec.directory
    if spec.name == "world":
        return (d / "phantom_world.json").exists(), False, None, None  # written atomically
    if spec.name == "tokenizer":
        return (d / TOKENIZER_FILE).exists(), False, None, None
    if spec.name == "clinical":  # no checkpoints: an unfinished one is trained again
        return clinical_lib.is_complete(d), d.exists(), None, None
    if spec.name == "codes":
        return False, (d / encode_lib.INDEX_FILE).exists(), None, None  # resumable by image
    if spec.name == "vqgan":
        finished = (d / "vqgan" / "config.json").exists()
        length = _json_field(d / "config.json", "train", "steps") if finished else None
        return finished, (d / "checkpoints").exists(), length, _latest_checkpoint(d / "checkpoints")
    done = d / DONE_FILE
    return (done.exists(), (d / "checkpoints").exists(), _json_field(done, "step"),
            _latest_checkpoint(d / "checkpoints"))


@dataclasses.dataclass
class Plan:
    """What this run does with each step (`step_record.Decision`) and the settings each step's
    STEP.json gets; `start`/`finish` write it (process 0)."""

    decisions: dict[str, step_record.Decision]
    settings: dict[str, dict[str, Any]]
    directories: dict[str, pathlib.Path]

    def notes(self) -> list[str]:
        return [d.note for d in self.decisions.values() if d.note and d.action != "redo"]

    def _write(self, name: str, status: str, **extra: Any) -> None:
        if name in self.directories and is_main_process():
            step_record.write(self.directories[name], name, self.settings[name], status, **extra)

    def start(self, name: str, **extra: Any) -> None:
        self._write(name, "started", **extra)

    def finish(self, name: str, **extra: Any) -> None:
        self._write(name, "done", **extra)

    def schedule_steps(self, name: str, steps: int) -> int:
        """The learning-rate schedule's length: fixed when the stage started (its record), the
        length a stage finished before records existed ran, or `steps` for a new stage."""
        d = self.decisions[name]
        if d.record is not None and d.record.get("schedule_steps"):
            return int(d.record["schedule_steps"])
        if d.action == "continue" and d.done_steps:
            return int(d.done_steps)
        return steps


def plan_steps(cfg: rc.RunConfig, paths: RunLayout, stages: tuple[int, ...]) -> Plan:
    """Before any work: what this run does with each of its steps, from each step's STEP.json and
    what the run asks of it (`step_record.decide`). A step holding other work than the run asks
    for is a SetupError naming the settings (recorded and asked)."""
    roles = {"world": "run", "clinical": "run", "vqgan": "run", "tokenizer": "run",
             "codes": "run"}
    if rc.skips_stage1(cfg):  # stage 2 starts where stage 1 would have
        if 2 not in stages:
            raise SetupError("--stage 1 with stage1.steps=0: there is no stage 1 to run "
                             "(stage1.steps=0 trains stage 2 from the base model): use --stage 2 "
                             "or both")
        if uses_base_model(cfg):
            roles["stage0"] = "run"
    elif 1 in stages:
        roles["stage1"] = "run"
        if uses_base_model(cfg):
            roles["stage0"] = "run"
    elif 2 in stages:
        roles["stage1"] = "read"  # --stage 2: stage 1's finished params, as they are
    if 2 in stages:
        roles["stage2"] = "run"
    decisions: dict[str, step_record.Decision] = {}
    settings: dict[str, dict[str, Any]] = {}
    directories: dict[str, pathlib.Path] = {}
    for spec in step_specs(cfg, paths):
        if spec.name not in roles:
            continue
        asked: dict[str, Any] = {}
        for name in spec.inputs:
            asked.update(settings.get(name, {}))
        asked.update(spec.own)
        settings[spec.name] = asked
        if spec.directory is None:
            continue
        directories[spec.name] = spec.directory
        finished, started, length, progress = _step_state(spec)
        try:
            if roles[spec.name] == "read":
                record = step_record.read(spec.directory)
                if not finished or (record is not None and record.get("status") != "done"):
                    raise SetupError(f"--stage 2 needs stage 1's final params, but "
                                     f"{spec.directory} has no finished stage 1 ({DONE_FILE}): "
                                     f"run --stage 1 (or both) first")
                decisions[spec.name] = step_record.Decision("reuse" if record else "legacy",
                                                            record)
                settings[spec.name] = record["settings"] if record else asked
                continue
            decision = step_record.decide(
                spec.label, spec.directory, asked, finished=finished, started=started,
                length_key=spec.length_key, legacy_length=length, derived=spec.derived)
        except step_record.StepConflict as err:
            raise SetupError(str(err)) from None
        want = asked.get(spec.length_key) if spec.length_key else None
        if decision.action == "resume" and progress is not None and want is not None \
                and progress > want:
            raise SetupError(f"{spec.label} in {spec.directory} has a checkpoint at step "
                             f"{progress}, past {spec.length_key}={want}: ask for {progress} or "
                             f"more, or start afresh with a new --workdir (or delete "
                             f"{spec.directory})")
        vqgan_changes = decisions.get("vqgan", step_record.Decision("reuse")).action not in (
            "reuse", "legacy")
        if spec.name == "codes" and started and vqgan_changes and decision.action != "redo":
            decision = step_record.Decision("redo", note=f"codes: {spec.directory} holds codes "
                                            f"of an earlier VQ-GAN; encoding them again")
        decisions[spec.name] = decision
    if roles.get("stage1") == "read" and "stage2" in settings:
        model_diffs = [k for k in step_record.differences(settings["stage1"], settings["stage2"])
                       if k.startswith("model.")]
        if model_diffs:
            made = step_record.describe(model_diffs, settings["stage1"], settings["stage2"])
            raise SetupError(f"stage 2 starts from stage 1's weights in {paths.stage(1)}, made "
                             f"with {made}: the model must be the same")
    return Plan(decisions, settings, directories)


def preflight(cfg: rc.RunConfig, workdir: str | pathlib.Path, stages: tuple[int, ...] = (1, 2)
              ) -> tuple[rc.RunConfig, RunLayout, Any, Plan]:
    """Everything a run checks before any work (it writes nothing): the data and VQ-GAN it is
    given, the mesh against the LLM's and the VQ-GAN's batches, and each step's record against
    what this run asks of it. A problem is a SetupError or MeshError of one line naming the
    setting to change. Returns the resolved config, the paths, the mesh and the plan."""
    if cfg.world is None and not cfg.data.world:
        raise SetupError("this preset has no phantom world: pass --set data.world=DIR (a "
                         "MIMIC-CXR-JPG root)")
    try:
        vq_cfg = vqgan_config(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise SetupError(f"vqgan_dir: {err}") from None
    cfg = rc.resolve(cfg, vq_cfg)
    paths = RunLayout(pathlib.Path(workdir))
    mesh = mesh_from_flag(cfg.mesh)
    check_global_batch(cfg.train.global_batch, mesh, flag="--set train.global_batch")
    plan = plan_steps(cfg, paths, stages)
    if "vqgan" in plan.decisions and plan.decisions["vqgan"].action not in ("reuse", "legacy"):
        vqgan_train.data_axis_size(cfg.vqgan.mesh_data, cfg.vqgan.batch_size, jax.device_count(),
                                   prefix="vqgan.")
        check_clinical(cfg, paths)
    return cfg, paths, mesh, plan


def check_clinical(cfg: rc.RunConfig, paths: RunLayout) -> None:
    """A clinical loss that cannot work or must not be used, before any work (SetupError): one
    without weight, a given classifier that does not load, or the evaluation's own."""
    if not cfg.clinical.net:
        return
    if cfg.vqgan.clinical_weight <= 0:
        raise SetupError(f"clinical.net={cfg.clinical.net} needs vqgan.clinical_weight > 0 (it "
                         f"is {cfg.vqgan.clinical_weight:g}); set it, or clinical.net= for no "
                         f"clinical loss")
    if not cfg.clinical.trains_here:
        if clinical_lib.same_network(cfg.clinical.net, paths.classifier):
            raise SetupError(f"clinical.net={cfg.clinical.net} is the evaluation's classifier: "
                             f"the VQ-GAN must not be trained against the network that scores "
                             f"it; use clinical.net=train or another classifier")
        try:
            clf.load_classifier(cfg.clinical.net)
        except (FileNotFoundError, ValueError) as err:
            raise SetupError(f"clinical.net: {err}") from None


def planned_stage(stage: int, cfg: rc.RunConfig, plan: Plan, say: Say, **kwargs: Any
                  ) -> StageResult:
    """`run_stage` as the plan decided: a finished stage is reused; otherwise it trains (new,
    resumed, or continued past the length it finished at) between its STEP.json's "started"
    and "done".

    The learning-rate schedule's length is fixed when a stage starts (`schedule_steps` in its
    record): a stage continued to more steps, or resumed with a larger `steps`, runs every step
    past that length at the schedule's end value (cosine: min_lr_ratio x learning_rate;
    constant: learning_rate), so the steps it already ran keep the rates they had."""
    name = f"stage{stage}"
    decision = plan.decisions[name]
    loop_cfg = rc.stage_loop(cfg, stage)
    train_cfg = rc.stage_train(cfg, stage)
    reuse = decision.action in ("reuse", "legacy")
    length = loop_cfg.steps
    if not reuse:
        length = plan.schedule_steps(name, loop_cfg.steps)
        train_cfg = dataclasses.replace(train_cfg, total_steps=length)
        schedule = ""
        if length < loop_cfg.steps:
            end = float(learning_rate_schedule(train_cfg)(length))
            schedule = (f"; the learning-rate schedule keeps its {length}-step length, so every "
                        f"step past {length} runs at its end value {end:.3g}")
        if decision.action == "continue":
            say(f"stage {stage}: continuing from step {decision.done_steps} (its last "
                f"checkpoint) to {STAGE_LENGTH_KEYS[stage]}={loop_cfg.steps}{schedule}")
        elif schedule:
            say(f"stage {stage}: resuming towards {STAGE_LENGTH_KEYS[stage]}={loop_cfg.steps}"
                f"{schedule}")
        plan.start(name, schedule_steps=length)
    result = run_stage(stage, train_cfg=train_cfg, loop_cfg=loop_cfg, reuse_done=reuse, **kwargs)
    if result.status == "done":
        plan.finish(name, schedule_steps=length, done_steps=result.step)
    return result


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def run(cfg: rc.RunConfig, workdir: str | pathlib.Path, *, stages: tuple[int, ...] = (1, 2),
        say: Say = print, progress: bool = True) -> int:
    """Every step of the run in `workdir`; returns a process exit code (0 also when preempted,
    after saving); `progress` draws the world's, the VQ-GAN's and the encoder's progress bars.
    `preflight` runs first: a configuration that cannot run, or a step that holds
    other work than asked for, raises before anything is written."""
    cfg, paths, mesh, plan = preflight(cfg, workdir, stages)
    write_config(cfg, paths, say)
    for note in plan.notes():
        say(note)
    say(f"workdir {paths.root}; mesh {dict(mesh.shape)} on {mesh.devices.size} "
        f"{jax.devices()[0].platform} device(s)")
    start = time.perf_counter()
    with PreemptionWatcher() as watcher:
        try:
            world = world_dir(cfg, paths, say, plan, progress, watcher)
            vq_dir = vqgan_dir(cfg, paths, world, say, plan, progress, watcher)
        except Preempted:
            say("preempted: run the same command again to resume")
            return 0
        vocab = vocabulary(cfg, paths, world, say)
        if plan.decisions["tokenizer"].action == "new":
            plan.finish("tokenizer")
        codes = image_codes(cfg, paths, world, vq_dir, say, plan, progress)
        result = llm_stages(cfg, paths, world, codes, vocab, mesh, stages, say, watcher, plan,
                            vq_dir)
        if result is None:
            say("preempted: checkpoint saved; run the same command again to resume")
            return 0
    if not (paths.llm / "config.json").exists() or result.status != "reused":
        save_llm(paths.llm, cfg.model, result.params, vocab, step=result.step, overwrite=True)
    say(f"llm: final model in {paths.llm}")
    if cfg.samples > 0:
        write_samples(cfg, paths, world, vq_dir, vocab, result.params, say)
    say(f"done in {time.perf_counter() - start:.0f} s. workdir {paths.root}: "
        f"{', '.join(paths.present())} (each stage: metrics.jsonl, tensorboard/)")
    return 0


# --------------------------------------------------------------------------------------------------
# A quick look at what the model learned
# --------------------------------------------------------------------------------------------------


GRID_CELL = 256  # px per image in samples/grid.png


def training_pictures(paths: RunLayout) -> list[str]:
    """samples.md lines linking the pictures the run's steps drew (those that exist)."""
    pictures = [("VQ-GAN training curves", paths.vqgan_run / curves.CURVES_FILE),
                ("VQ-GAN reconstructions of held-out images",
                 paths.vqgan_run / vqgan_train.RECONSTRUCTIONS_FILE)]
    pictures += [(f"stage {k}{' (base model)' if k == 0 else ''} training curves",
                  paths.stage(k) / curves.CURVES_FILE) for k in (0, 1, 2)]
    lines = [f"### {title}\n\n![{title}]({os.path.relpath(path, paths.samples)})\n"
             for title, path in pictures if path.is_file()]
    return ["## Training", "", *lines] if lines else []


def write_samples(cfg: rc.RunConfig, paths: RunLayout, world: pathlib.Path, vq_dir: pathlib.Path,
                  vocab: Vocab, params: Any, say: Say) -> None:
    """A few test-split reports -> images and images -> reports: samples/grid.png (each row: the
    original image, its VQ-GAN reconstruction, the image drawn from its report; labelled, shown
    at GRID_CELL px) and samples/samples.md (the texts, the grid and the run's training
    pictures)."""
    n = cfg.samples
    codes = pipeline_lib.flat_codes(str(cfg.data.codes or paths.codes))
    test = mimic.load_mimic(world, codes, stage=2, splits=("test",),
                            tokens_per_image=vqgan_config(cfg).tokens_per_image,
                            codebook_size=vqgan_config(cfg).n_embed).records[:n]
    if not test:
        say("samples: no test-split pairs to sample from")
        return
    rng_reports, rng_images = jax.random.split(jax.random.key(cfg.train.seed))
    reports = inference.reports_from_images(params, cfg.model, vocab, [r.codes for r in test],
                                            rng_reports)
    drawn = inference.images_from_reports(
        params, cfg.model, vocab, [r.report for r in test], rng_images,
        vqgan_config(cfg).tokens_per_image,
        gen=dataclasses.replace(inference.IMAGE_SAMPLING, temperature=cfg.image_temperature),
        guidance=cfg.guidance)
    if not is_main_process():
        return  # every process generated (the programs are global); one decodes and writes
    codec = encode_lib.Codec.load(vq_dir, batch_size=len(test))
    real = codec.decode(np.stack([r.codes for r in test]))
    fake = codec.decode(drawn)
    paths.samples.mkdir(parents=True, exist_ok=True)
    size = vqgan_config(cfg).resolution
    columns = [("VQ-GAN reconstruction", real),
               (f"from its report (guidance {cfg.guidance:g}, temperature "
                f"{cfg.image_temperature:g})", fake)]
    try:
        columns.insert(0, ("original", np.stack([images_lib.load_image(
            mimic.image_path(world, r.subject_id, r.study_id, r.dicom_id), size) for r in test])))
    except images_lib.ImageError as err:
        say(f"samples: grid.png without the originals ({err})")
    sheet = images_lib.labeled_columns(columns, cell=GRID_CELL)
    atomic_write(paths.samples / "grid.png", lambda tmp: sheet.save(tmp, format="PNG"))
    lines = ["# Samples (test split)", "", "![samples](grid.png)", "",
             f"grid.png: one test-split study per row: {' | '.join(c for c, _ in columns)}; the "
             f"model reads and draws the VQ-GAN's {size} px images, shown here at {GRID_CELL} px "
             f"(nearest).", ""]
    lines += training_pictures(paths)
    for i, (record, generated) in enumerate(zip(test, reports)):
        lines += [f"## {i}: {record.dicom_id}", "", f"**reference report:** {record.report}", "",
                  f"**report generated from the image:** {generated}", ""]
    atomic_write_text(paths.samples / "samples.md", "\n".join(lines))
    say(f"samples: {paths.samples / 'grid.png'} and {paths.samples / 'samples.md'}")
