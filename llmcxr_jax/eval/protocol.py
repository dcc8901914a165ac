"""The paper's evaluation protocol on a training run's workdir (`launch/evaluate.py`).

On the held-out TEST split of the world the model was trained on:

1. report -> image: images are generated from the test reports (exactly `tokens_per_image`
   constrained codes each), decoded by the VQ-GAN and scored by the CXR classifier against the
   CheXpert labels of the studies whose reports produced them (`alignment.image_alignment`).
   Beside them: the same metrics on the VQ-GAN reconstructions of the real test images (the upper
   bound the generator can reach through this VQ-GAN) and the chance levels; FID between generated
   and real test images in the classifier's feature space (and of the reconstructions, the floor).
   Generation uses classifier-free guidance at the headline scale (`EvalOptions.guidance`,
   default the run's `guidance`), codes drawn at the run's `image_temperature`
   (`EvalOptions.image_temperature` overrides it); AUROC / F1 / FID are also measured at S = 1
   and every other requested scale, from the same keys (`report2image.by_guidance`).
2. image -> report: reports are generated from the test images' codes with the original's
   sampling (top_p 0.92); the labeler reads generated and reference reports
   (`alignment.report_agreement`); BLEU-1 / BLEU-4 / ROUGE-L (`text_metrics.report_metrics`).
   The same metrics of greedy decoding are a secondary block (`image2report.greedy`).
3. language retention: perplexity and exact-match accuracy on held-out procedural instructions,
   for the base and the fine-tuned model (`language.retention`).
4. the conditioning gap of each direction (`conditioning.conditioning_gap`: response NLL with
   another study's input minus with the true input, nats per response token) on the test items
   and on as many train pairs (a seeded sample of the pairs trained in that direction), and the
   learning curve (loss and gap over the stages' steps, from their metrics.jsonl) as a PNG.
5. the single-finding probes (`probes`): both directions' metrics again on the test items whose
   study has exactly one finding (`single_finding`), none (`no_finding`) or any (`any_finding`),
   as `report2image.<group>` and `image2report.<group>`.

Every headline number carries a 95 % percentile bootstrap interval over the test items
(`bootstrap`, 1,000 resamples, seeded): `ci95` beside the numbers of each direction (macro /
micro AUROC and F1, BLEU-4, ROUGE-L) and in each conditioning-gap block (over its pairs).

Test items: by default every frontal (PA/AP) test image with codes and a report section (the
classifier judges frontal views, which the generated images imitate), with the report section
the final model was trained on (IMPRESSION after stage 2, FINDINGS + IMPRESSION after stage 1
only). `n_test` keeps the first N by dicom id. Everything random derives from `seed`.

Outputs in OUT (default WORKDIR/eval): eval.json, report.md with images/*.png, reports.jsonl
(every item's reference and generated report) and predictions.npz (labels, classifier
probabilities, generated codes), so every number can be recomputed from the files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax.data import images as images_lib
from llmcxr_jax.data import labeler, mimic
from llmcxr_jax.data import pipeline as pipeline_lib
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.eval import (alignment, bootstrap, classification_metrics, conditioning,
                             eval_report, language, learning_curve, probes)
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.eval import fid as fid_lib
from llmcxr_jax.eval import gap_cells
from llmcxr_jax.eval import text_metrics
from llmcxr_jax.eval import train_classifier as train_clf
from llmcxr_jax.io_utils import atomic_write_text
from llmcxr_jax.llm import inference, serving
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.text import prompts
from llmcxr_jax.vqgan import clinical as clinical_lib
from llmcxr_jax.vqgan import encode as encode_lib

Say = Callable[[str], None]
SUBSETS = ("frontal", "stage2", "all")
EVAL_FILE = "eval.json"
CURVE_FILE = "learning_curve.png"
GAP_CELLS_FILE = "gap_cells.png"
RANDOM_INIT = "random-init"


class EvalInputError(ValueError):
    """A workdir (or flag) the protocol cannot run on; the message names what is missing."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    classifier: str = ""  # "" = WORKDIR/classifier, trained on the world's train split if absent
    n_test: int | None = None  # None = every test item
    batch_size: int = 16
    seed: int = 0
    base: str = ""  # "" = WORKDIR/base, else the run's init_from, else a random init
    out: str = ""  # "" = WORKDIR/eval
    n_language: int = 64  # held-out instructions
    report_tokens: int = 128  # max new tokens of a generated report (the original's 128)
    n_show: int = 8  # items shown with their images in report.md
    subset: str = "frontal"  # frontal | stage2 (the refined subset) | all (laterals too)
    report_stage: int | None = None  # None = the final model's: 2 if the run had stage 2
    mesh: str = "-1"  # the LLM's mesh (all devices on fsdp)
    classifier_steps: int = train_clf.TrainClassifierConfig.steps  # when one must be trained
    labeler_section: str = "findings+impression"
    # Report -> image classifier-free guidance scales. The first is the headline (the
    # `report2image` block); () = the run's `guidance` (WORKDIR/config.json). S = 1 (plain
    # sampling) is always evaluated too; `report2image.by_guidance` holds AUROC / F1 / FID per S.
    guidance: tuple[float, ...] = ()
    # Temperature of the generated codes at every S; None = the run's `image_temperature`.
    image_temperature: float | None = None
    progress: bool = True  # progress bars (training a classifier); the evaluation is unchanged

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise EvalInputError(f"--subset {self.subset!r}: expected one of {SUBSETS}")
        if self.batch_size < 1:
            raise EvalInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.n_test is not None and self.n_test < 2:
            raise EvalInputError(f"--n-test must be >= 2 (FID needs two images), got {self.n_test}")
        if self.report_stage not in (None, 1, 2):
            raise EvalInputError(f"--report-stage must be 1 or 2, got {self.report_stage}")
        if self.n_show < 0 or self.report_tokens < 1:
            raise EvalInputError(f"--n-show must be >= 0 and --report-tokens >= 1, got "
                                 f"{self.n_show} and {self.report_tokens}")
        if self.n_language < 1:
            raise EvalInputError(f"--n-language must be >= 1, got {self.n_language}")
        if not all(0.0 <= s < float("inf") for s in self.guidance):
            raise EvalInputError(f"--guidance scales must be finite numbers >= 0, got "
                                 f"{list(self.guidance)}")
        if self.image_temperature is not None and not 0.0 < self.image_temperature < float("inf"):
            raise EvalInputError(f"--image-temperature must be a finite number > 0, got "
                                 f"{self.image_temperature}")


# --------------------------------------------------------------------------------------------------
# What the workdir holds
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunInputs:
    run: RunLayout
    world: pathlib.Path
    codes: pathlib.Path
    instructions: pathlib.Path | None  # the training instructions (for the held-out draw)
    world_seed: int
    init_from: str
    report_stage: int


    @property
    def root(self) -> pathlib.Path:
        return self.run.root


def _run_config(run: RunLayout) -> dict[str, Any]:
    path = run.config
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def resolve_inputs(workdir: str | pathlib.Path, options: EvalOptions) -> RunInputs:
    """The world, codes and training instructions of a run workdir, with clear errors."""
    run = RunLayout(pathlib.Path(workdir))
    root = run.root
    if not root.is_dir():
        raise EvalInputError(f"--workdir {root} does not exist or is not a directory")
    cfg = _run_config(run)
    data = cfg.get("data") or {}
    world = run.world_for(data.get("world") or "")
    if not world.is_dir():
        raise EvalInputError(
            f"{root}: no world to evaluate on: {run.world} does not exist and "
            f"{run.config} names no existing data.world (got {data.get('world')!r})")
    try:
        mimic.find_csv(world, mimic.SPLIT_CSV)
    except FileNotFoundError as e:
        raise EvalInputError(f"world {world} has no split CSV: {e}") from None
    codes = run.codes_for(data.get("codes") or "")
    if encode_lib.read_index(codes) is None:
        raise EvalInputError(f"{codes} holds no image codes (no {encode_lib.INDEX_FILE}); run "
                             f"launch/train.py (it encodes the world) or launch/encode_images.py")
    instructions = pathlib.Path(data["instructions"]) if data.get("instructions") else None
    if instructions is None and (world / "instructions.jsonl").is_file():
        instructions = world / "instructions.jsonl"
    world_cfg = cfg.get("world") or {}
    stage = options.report_stage or (2 if (cfg.get("stage2") or {}).get("steps", 1) > 0 else 1)
    return RunInputs(run=run, world=world, codes=codes, instructions=instructions,
                     world_seed=int(world_cfg.get("seed", 0)),
                     init_from=str(cfg.get("init_from") or ""), report_stage=stage)


def _mesh(flag: str):
    """The mesh of `flag`, on the first devices it needs when it asks for fewer than all."""
    try:
        return mesh_from_flag(flag)
    except ValueError as e:
        parts = flag.replace(",", "x").split("x")
        sizes = [int(s) for s in parts if s.strip().lstrip("-").isdigit()]
        n = int(np.prod(sizes)) if sizes and min(sizes) > 0 else 0
        if 0 < n < jax.device_count():
            return mesh_from_flag(flag, jax.devices()[:n])
        raise EvalInputError(f"--mesh {flag}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Test items
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestItem:
    record: mimic.MimicRecord
    labels: np.ndarray  # CheXpert values [L] of the classifier's labels (NaN = blank)
    image_path: pathlib.Path


def test_items(inputs: RunInputs, codes: dict[str, np.ndarray], tokens_per_image: int,
               codebook_size: int, label_names: Sequence[str], options: EvalOptions,
               say: Say) -> list[TestItem]:
    """The test split's image-report pairs (see the module docstring), with their labels."""
    skips = SkipCounter("evaluation test items")
    metadata = mimic.read_metadata(inputs.world, skips)
    frontal = {d for d, m in metadata.items() if m.view in mimic.FRONTAL_VIEWS}
    subset = None
    if inputs.report_stage == 2:
        subset = frontal if options.subset == "frontal" else (
            set(metadata) if options.subset == "all" else None)
    data = mimic.load_mimic(inputs.world, codes, stage=inputs.report_stage, splits=("test",),
                            tokens_per_image=tokens_per_image, codebook_size=codebook_size,
                            stage2_subset=subset)
    records = data.records
    if options.subset == "frontal":
        records = [r for r in records if r.dicom_id in frontal]
    elif options.subset == "stage2" and inputs.report_stage == 1:
        chosen = mimic.select_stage2(metadata)
        records = [r for r in records if r.dicom_id in chosen]
    labels = train_clf.read_chexpert(inputs.world, label_names, skips)
    items = []
    for r in records:
        if r.study_id not in labels:
            skips.add("no_chexpert_row", r.study_id)
            continue
        items.append(TestItem(r, labels[r.study_id],
                              mimic.image_path(inputs.world, r.subject_id, r.study_id, r.dicom_id)))
    if options.n_test is not None:
        items = items[:options.n_test]
    say(f"test items: {len(items)} ({options.subset} images of the test split, stage "
        f"{inputs.report_stage} reports); reader skips: {dict(data.skips.counts)}"
        + (f"; {dict(skips.counts)}" if skips.total else ""))
    if len(items) < 2:
        raise EvalInputError(f"{inputs.world}: only {len(items)} usable test item(s) (need >= 2); "
                             f"skips: {dict(data.skips.counts)}")
    return items


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def classifier_for(inputs: RunInputs, options: EvalOptions, image_size: int, say: Say,
                   vqgan_dir: pathlib.Path | None = None
                   ) -> tuple[clf.ClassifierConfig, Any, np.ndarray | float, pathlib.Path]:
    """(config, params, decision thresholds, dir): the given classifier, WORKDIR/classifier, or
    one trained there on the world's train split at the VQ-GAN's image size. Never the network
    the VQ-GAN's clinical loss was trained against (`vqgan/clinical.py`): that is refused."""
    if options.classifier:
        directory = pathlib.Path(options.classifier)
        if not (directory / clf.CONFIG_FILE).is_file():
            raise EvalInputError(f"--classifier {directory}: no {clf.CONFIG_FILE} there (a "
                                 f"launch/train_classifier.py output is expected)")
    else:
        directory = inputs.run.classifier
        complete = all((directory / f).is_file() for f in (clf.CONFIG_FILE, clf.PARAMS_FILE))
        if not complete:
            say(f"classifier: none in {directory}; training one on {inputs.world} (train split, "
                f"{image_size} px, {options.classifier_steps} steps)")
            train_clf.train(inputs.world, directory, clf.ClassifierConfig(image_size=image_size),
                            train_clf.TrainClassifierConfig(steps=options.classifier_steps,
                                                            seed=options.seed),
                            progress=options.progress, log=say)
    for net in clinical_lib.nets_trained_against(inputs.run.clinical, vqgan_dir):
        if clinical_lib.same_network(directory, net):
            raise EvalInputError(
                f"{'--classifier' if options.classifier else 'classifier'} {directory} is the "
                f"network the VQ-GAN's clinical loss was trained against ({net}): it must not "
                f"score that VQ-GAN; pass --classifier with another (without it, "
                f"WORKDIR/classifier is trained with the evaluation's own recipe)")
    config, params = clf.load_classifier(directory)
    thresholds = clf.load_thresholds(directory, config)
    say(f"classifier: {directory} ({len(config.labels)} labels, {config.image_size} px, "
        f"thresholds {'tuned' if thresholds is not None else '0.5'})")
    return config, params, (0.5 if thresholds is None else thresholds), directory


def base_model(inputs: RunInputs, options: EvalOptions, finetuned: serving.Bundle, mesh: Any,
               say: Say) -> tuple[str, Any, Any, Any]:
    """(source, config, params, vocab) of the base model (see `EvalOptions.base`)."""
    for source in (options.base, str(inputs.run.base), inputs.init_from):
        if not source:
            continue
        path = pathlib.Path(source)
        if source != options.base and not path.exists():
            if source == inputs.init_from:
                raise EvalInputError(f"the run's init_from {source} does not exist: pass --base "
                                     f"DIR (an LLM workdir) for the language-retention baseline")
            continue
        try:
            bundle = serving.load_bundle(path, mesh, load_vqgan=False)
        except serving.BundleError as e:
            raise EvalInputError(f"base model {source}: {e}") from None
        say(f"base model: {source}")
        return str(source), bundle.model_config, bundle.params, bundle.vocab
    config = finetuned.model_config
    params = random_init(config, shardings_lib.param_shardings(config, mesh), options.seed)
    say("base model: random-init (no --base, WORKDIR/base or init_from)")
    return RANDOM_INIT, config, params, finetuned.vocab


def random_init(config: Any, shardings: Any, seed: int) -> Any:
    """The model's initial distributions drawn on the host and placed into `shardings` (no
    compilation): weights and embeddings normal(initializer_range), LayerNorm scale 1, biases 0."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: Any, sharding: Any) -> jax.Array:
        name = getattr(path[-1], "key", str(path[-1]))
        if name in ("kernel", "embedding"):
            x = rng.standard_normal(leaf.shape, np.float32) * config.initializer_range
        elif name == "scale":
            x = np.ones(leaf.shape, np.float32)
        else:
            x = np.zeros(leaf.shape, np.float32)
        return jax.device_put(x.astype(leaf.dtype), sharding)

    return jax.tree_util.tree_map_with_path(draw, shardings_lib.abstract_params(config), shardings)


# --------------------------------------------------------------------------------------------------
# Batched generation and image helpers
# --------------------------------------------------------------------------------------------------


def in_batches(items: Sequence[Any], batch_size: int, fn: Callable[[list, int], Sequence[Any]],
               what: str, say: Say) -> list[Any]:
    """`fn(chunk, start)` over fixed-size chunks (the last padded with its last item, so one
    compilation serves all), outputs trimmed to the real items; a progress line per batch."""
    out: list[Any] = []
    start_time = time.perf_counter()
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        out.extend(list(fn(chunk, start))[:real])
        say(f"{what}: {len(out)}/{len(items)} ({time.perf_counter() - start_time:.1f} s)")
    return out


def prompt_bucket(lengths: Sequence[int], multiple: int = 64) -> int:
    """A `length_multiple` that pads every prompt of a task to one length (the longest, rounded
    up), so each task compiles its generation loop once."""
    return -(-max(lengths) // multiple) * multiple


@functools.lru_cache(maxsize=None)
def _classifier_forward(config: clf.ClassifierConfig) -> Callable:
    """jitted (params, images) -> [B, L + F]: sigmoid probabilities then features."""
    model = clf.CXRClassifier(config)

    def forward(p, x):
        logits, features = model.apply({"params": p}, x)
        return jnp.concatenate([jax.nn.sigmoid(logits), features], axis=-1)

    return jax.jit(forward)


def classifier_outputs(config: clf.ClassifierConfig, params: Any, batch_size: int
                       ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """images -> (sigmoid probabilities [N, L], features [N, F]) from one jitted forward."""
    forward = _classifier_forward(config)
    n_labels = len(config.labels)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        both = clf.batched(forward, params, images, batch_size)
        return both[:, :n_labels], both[:, n_labels:]

    return run


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W, C] -> [N, size, size, C] (Lanczos, as the data pipeline), unchanged if equal."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.asarray(jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                       method="lanczos3")).clip(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------


def evaluate(workdir: str | pathlib.Path, options: EvalOptions = EvalOptions(),
             say: Say = print) -> dict[str, Any]:
    """Run the whole protocol; writes OUT/eval.json, report.md, images/, reports.jsonl and
    predictions.npz, and returns the eval.json dict."""
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    inputs = resolve_inputs(workdir, options)
    out = pathlib.Path(options.out) if options.out else inputs.run.eval
    mesh = _mesh(options.mesh)
    try:
        bundle = serving.load_bundle(inputs.root, mesh)
    except serving.BundleError as e:
        raise EvalInputError(str(e)) from None
    vq_cfg, vq_params = bundle.require_vqgan("the protocol decodes generated codes")
    say(f"model: {bundle.llm_dir} (step {bundle.step}); VQ-GAN {bundle.vqgan_dir} "
        f"({vq_cfg.resolution} px, {vq_cfg.tokens_per_image} tokens per image)")
    cls_cfg, cls_params, thresholds, cls_dir = classifier_for(inputs, options, vq_cfg.resolution,
                                                              say, bundle.vqgan_dir)
    codes = {k: np.asarray(v).reshape(-1) for k, v in encode_lib.load_codes(inputs.codes).items()}
    items = test_items(inputs, codes, vq_cfg.tokens_per_image, vq_cfg.n_embed, cls_cfg.labels,
                       options, say)
    records = [it.record for it in items]
    key_r2i, key_i2r, key_lang = jax.random.split(jax.random.key(options.seed), 3)
    decoder = encode_lib.Codec(vq_cfg, vq_params, options.batch_size).decode
    timing["setup_s"] = time.perf_counter() - t0

    # 1. report -> image ---------------------------------------------------------------------------
    t = time.perf_counter()
    bucket = prompt_bucket([len(prompts.report_to_image_prompt_ids(bundle.vocab, r.report, 0))
                            for r in records])
    # The headline guidance scale first, then S = 1 and the other scales (each once).
    scales = list(dict.fromkeys([options.guidance[0] if options.guidance else bundle.guidance,
                                 1.0, *options.guidance]))
    temperature = (bundle.image_temperature if options.image_temperature is None
                   else options.image_temperature)

    def images_at(scale: float) -> np.ndarray:
        """Codes of every test report at guidance `scale` (the same keys at every scale)."""
        return np.asarray(in_batches(
            [r.report for r in records], options.batch_size,
            lambda chunk, start: inference.images_from_reports(
                bundle.params, bundle.model_config, bundle.vocab, chunk,
                jax.random.fold_in(key_r2i, start), vq_cfg.tokens_per_image,
                dataclasses.replace(inference.IMAGE_SAMPLING, temperature=temperature,
                                    length_multiple=bucket),
                guidance=scale),
            "report->image" + ("" if scale == 1.0 else f" (guidance {scale:g})"), say))

    gen_codes = images_at(scales[0])
    generated = decoder(gen_codes)
    reconstructed = decoder(np.stack([r.codes for r in records]))
    real = np.stack([images_lib.load_image(it.image_path, vq_cfg.resolution) for it in items])
    as_cls = lambda x: resize_images(x, cls_cfg.image_size)  # noqa: E731
    score = classifier_outputs(cls_cfg, cls_params, options.batch_size)
    (probs_gen, f_gen), (probs_rec, f_rec), (_, f_real) = (
        score(as_cls(x)) for x in (generated, reconstructed, real))
    feats = {"generated": f_gen, "reconstructed": f_rec, "real": f_real}
    label_values = np.stack([it.labels for it in items])
    r2i = alignment.image_alignment(label_values, probs_gen, cls_cfg.labels, thresholds)
    rec = alignment.image_alignment(label_values, probs_rec, cls_cfg.labels, thresholds)
    r2i["reconstruction"] = {k: rec[k] for k in ("n", "findings", "auroc", "f1", "per_finding")}
    r2i.update({
        "fid": fid_lib.fid_from_features(feats["generated"], feats["real"]),
        "fid_reconstruction": fid_lib.fid_from_features(feats["reconstructed"], feats["real"]),
        "fid_n": {"generated": len(generated), "real": len(real)},
        "fid_features": f"cxr_classifier ({cls_dir}, {cls_cfg.feature_dim}-d pooled features)",
        "inception_fid": "not computed: no Inception-v3 weights were given (none ship with the "
                         "project); the FID above is in the CXR classifier's feature space",
        "classifier": str(cls_dir), "tokens_per_image": vq_cfg.tokens_per_image,
        "guidance": scales[0], "temperature": temperature,
        "null_report_rate": (_run_config(inputs.run).get("data") or {}).get("null_report_rate")})
    by_guidance = {scales[0]: (r2i, gen_codes, probs_gen)}
    for scale in scales[1:]:
        scale_codes = images_at(scale)
        scale_probs, scale_feats = score(as_cls(decoder(scale_codes)))
        scored = alignment.image_alignment(label_values, scale_probs, cls_cfg.labels, thresholds)
        scored["fid"] = fid_lib.fid_from_features(scale_feats, feats["real"])
        by_guidance[scale] = (scored, scale_codes, scale_probs)
    r2i["by_guidance"] = {f"{s:g}": {"guidance": s, "auroc": by_guidance[s][0]["auroc"],
                                     "f1": by_guidance[s][0]["f1"], "fid": by_guidance[s][0]["fid"]}
                          for s in sorted(by_guidance)}
    timing["report2image_s"] = time.perf_counter() - t
    say(f"report->image (temperature {temperature:g}): macro AUROC {_f(r2i['auroc']['macro'])} "
        f"(reconstructions {_f(rec['auroc']['macro'])}, chance 0.5), FID {r2i['fid']:.2f}"
        + "".join(f"; guidance {k}: macro AUROC {_f(v['auroc']['macro'])}, FID {v['fid']:.2f}"
                  for k, v in r2i["by_guidance"].items()))

    # 2. image -> report ---------------------------------------------------------------------------
    t = time.perf_counter()
    bucket = prompt_bucket([len(prompts.image_to_report_prompt_ids(bundle.vocab, r.codes, 0))
                            for r in records])
    sampling = dataclasses.replace(inference.REPORT_SAMPLING, max_new_tokens=options.report_tokens,
                                   length_multiple=bucket)
    gen_reports = in_batches(
        [r.codes for r in records], options.batch_size,
        lambda chunk, start: inference.reports_from_images(
            bundle.params, bundle.model_config, bundle.vocab, chunk,
            jax.random.fold_in(key_i2r, start), sampling),
        "image->report", say)
    references = [r.report for r in records]
    i2r = alignment.report_agreement(gen_reports, references, options.labeler_section)
    i2r.update(text_metrics.report_metrics(gen_reports, references))
    i2r["decoding"] = {"do_sample": sampling.do_sample, "top_p": sampling.top_p,
                       "temperature": sampling.temperature}
    # A secondary number beside the paper's sampling: the same images, greedy decoding (the
    # headline stays the original's top-p sampling).
    greedy_reports = in_batches(
        [r.codes for r in records], options.batch_size,
        lambda chunk, start: inference.reports_from_images(
            bundle.params, bundle.model_config, bundle.vocab, chunk,
            jax.random.fold_in(key_i2r, start), dataclasses.replace(sampling, do_sample=False)),
        "image->report (greedy)", say)
    greedy = alignment.report_agreement(greedy_reports, references, options.labeler_section)
    i2r["greedy"] = {"decoding": "greedy", "n": greedy["n"], "auroc": greedy["auroc"],
                     "f1": greedy["f1"], **text_metrics.report_metrics(greedy_reports, references)}
    timing["image2report_s"] = time.perf_counter() - t
    say(f"image->report: micro F1 {_f(i2r['f1']['micro'])} (chance "
        f"{_f(i2r['chance']['f1']['micro'])}; greedy decoding {_f(greedy['f1']['micro'])}), "
        f"BLEU-4 {i2r['bleu4']:.3f}, ROUGE-L {i2r['rouge_l']:.3f}")

    # 3. language retention ------------------------------------------------------------------------
    t = time.perf_counter()
    heldout = language.heldout_instructions(
        options.n_language, inputs.world_seed + language.HELDOUT_SEED_OFFSET + options.seed,
        language.training_pairs(inputs.instructions))
    base_source, base_cfg, base_params, base_vocab = base_model(inputs, options, bundle, mesh, say)
    lang = {"n": len(heldout), "heldout_seed": inputs.world_seed + language.HELDOUT_SEED_OFFSET
            + options.seed, "deduplicated_against": str(inputs.instructions or "")}
    lang["base"] = language.retention(base_params, base_cfg, base_vocab, heldout, key_lang,
                                      options.batch_size, base_source, say)
    lang["finetuned"] = language.retention(bundle.params, bundle.model_config, bundle.vocab,
                                           heldout, key_lang, options.batch_size,
                                           str(bundle.llm_dir), say)
    timing["language_s"] = time.perf_counter() - t

    # 4. conditioning gap, learning curve, intervals -----------------------------------------------
    t = time.perf_counter()
    r2i_truth = alignment.binarize(label_values)
    gaps = conditioning_gaps(inputs, bundle, records, codes, vq_cfg, options, mesh, r2i_truth,
                             cls_cfg.labels)
    r2i["conditioning_gap"], i2r["conditioning_gap"] = gaps["report2image"], gaps["image2report"]
    by_cell = gaps["report2image"]["test"].get("by_cell")
    cells_png = (gap_cells.plot(by_cell, out / eval_report.IMAGES_DIR / GAP_CELLS_FILE)
                 if by_cell else None)
    say("conditioning gap (nats/token, mismatched - true input): " + "; ".join(
        f"{d} train {_f(g['train']['gap'])} test {_f(g['test']['gap'])} "
        f"(n {g['train']['n_pairs']} / {g['test']['n_pairs']})" for d, g in gaps.items()))
    timing["conditioning_gap_s"] = time.perf_counter() - t
    t = time.perf_counter()
    i2r_truth, i2r_scores = alignment.report_truth_and_scores(gen_reports, references,
                                                              options.labeler_section)
    r2i["ci95"] = alignment.scored_intervals(r2i_truth, probs_gen, thresholds, options.seed)
    i2r["ci95"] = {**alignment.scored_intervals(i2r_truth, i2r_scores, 0.5, options.seed),
                   **bootstrap.text_intervals(gen_reports, references, seed=options.seed)}
    i2r["greedy"]["ci95"] = alignment.scored_intervals(
        *alignment.report_truth_and_scores(greedy_reports, references, options.labeler_section),
        0.5, options.seed)
    timing["bootstrap_s"] = time.perf_counter() - t
    t = time.perf_counter()
    r2i.update(probes.probe_blocks(label_values, cls_cfg.labels, r2i_truth, probs_gen,
                                   cls_cfg.labels, thresholds, seed=options.seed))
    i2r.update(probes.probe_blocks(label_values, cls_cfg.labels, i2r_truth, i2r_scores,
                                   labeler.LABELS, 0.5, seed=options.seed, with_jaccard=True))
    say("single-finding probes (" + ", ".join(
        f"{g} n {r2i[g]['n']}" for g in probes.GROUPS) + f"): report->image macro AUROC "
        f"{_f(_get(r2i, 'single_finding', 'auroc', 'macro'))}, image->report micro F1 "
        f"{_f(_get(i2r, 'single_finding', 'f1', 'micro'))}")
    timing["probes_s"] = time.perf_counter() - t
    curve = learning_curve.plot(inputs.root, out / eval_report.IMAGES_DIR / CURVE_FILE)

    result = {
        "workdir": str(inputs.root), "seed": options.seed, "n_test": len(items),
        "subset": options.subset, "report_stage": inputs.report_stage,
        "model": {"llm": str(bundle.llm_dir), "step": bundle.step, "vqgan": str(bundle.vqgan_dir)},
        "report2image": r2i, "image2report": i2r, "language": lang,
        "bootstrap": {"method": "percentile", "level": 0.95, "resamples": bootstrap.RESAMPLES,
                      "seed": options.seed, "over": "test items (conditioning gap: its pairs)"},
        "learning_curve": f"{eval_report.IMAGES_DIR}/{CURVE_FILE}" if curve else None,
        "gap_cells": f"{eval_report.IMAGES_DIR}/{GAP_CELLS_FILE}" if cells_png else None,
        "finding_groups": {"groups": list(probes.GROUPS), "rule": probes.RULE,
                           "labels": list(cls_cfg.labels)},
        "options": dataclasses.asdict(options),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_items(out, items, gen_reports, greedy_reports, gen_codes, probs_gen, probs_rec,
                 cls_cfg.labels,
                 guidance_scales=np.asarray(sorted(by_guidance), np.float64),
                 probs_generated_by_guidance=np.stack([by_guidance[s][2]
                                                       for s in sorted(by_guidance)]),
                 generated_codes_by_guidance=np.stack([by_guidance[s][1]
                                                       for s in sorted(by_guidance)]))
    eval_report.write(out, result, items=[(r.dicom_id, r.report) for r in records],
                      generated_reports=gen_reports, generated=generated,
                      reconstructed=reconstructed, n_show=options.n_show)
    timing["total_s"] = time.perf_counter() - t0
    result["timing"] = {k: round(v, 2) for k, v in timing.items()}
    result = classification_metrics.finite_or_none(result)
    atomic_write_text(out / EVAL_FILE, json.dumps(result, indent=2) + "\n")
    say(f"eval: {out / EVAL_FILE} and {out / eval_report.REPORT_FILE} "
        f"({timing['total_s']:.0f} s)")
    return result


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _get(block: Any, *keys: str) -> Any:
    """block[k1][k2]...; None where a key is missing (a probe group that was not measured)."""
    for key in keys:
        if not isinstance(block, dict) or key not in block:
            return None
        block = block[key]
    return block


def conditioning_gaps(inputs: RunInputs, bundle: Any, test_records: Sequence[mimic.MimicRecord],
                      codes: dict[str, np.ndarray], vq_cfg: Any, options: EvalOptions, mesh: Any,
                      test_positive: np.ndarray, names: Sequence[str]
                      ) -> dict[str, dict[str, Any]]:
    """direction -> {"train": block, "test": block}, each block `GapResult.as_dict()` with its
    `ci95`: on the test items, and on a seeded sample of as many of the train pairs the final
    stage trained in that direction (its report section and direction rule); pairs longer than
    the run's seq_len are left out, as training drops them. The report -> image test block also
    holds `by_cell`, the gap over the VQ-GAN grid (`gap_cells.cell_gap_block`; `test_positive`
    [N, L] marks each test item's findings `names`)."""
    cfg = _run_config(inputs.run)
    data = cfg.get("data") or {}
    seq_len = (cfg.get("train") or {}).get("seq_len") or data.get("seq_len")
    train = mimic.load_mimic(inputs.world, codes, stage=inputs.report_stage, splits=("train",),
                             tokens_per_image=vq_cfg.tokens_per_image,
                             codebook_size=vq_cfg.n_embed)
    trained = pipeline_lib.pair_records(train.records, data.get("direction", "alternate"))
    out: dict[str, dict[str, Any]] = {}
    for direction in conditioning.DIRECTIONS:
        pool = trained[direction]
        sample = np.random.default_rng(options.seed).permutation(len(pool))[:len(test_records)]
        out[direction] = {}
        for split, pairs in (("train", [pool[i] for i in sample]), ("test", test_records)):
            try:
                r = conditioning.conditioning_gap(
                    bundle.params, bundle.model_config, bundle.vocab, pairs, direction,
                    batch_size=options.batch_size, seed=options.seed, max_len=seq_len, mesh=mesh)
                out[direction][split] = {**r.as_dict(), "ci95": r.gap_ci95(seed=options.seed)}
                if direction == "report2image" and split == "test":
                    out[direction][split]["by_cell"] = gap_cells.cell_gap_block(
                        r, vq_cfg.tokens_per_image, test_positive, names)
            except ValueError as err:  # too few pairs, or too few studies, to mismatch
                out[direction][split] = {"n_pairs": 0, "gap": None, "not_measured": str(err)}
    return out


def _write_items(out: pathlib.Path, items: Sequence[TestItem], gen_reports: Sequence[str],
                 greedy_reports: Sequence[str], gen_codes: np.ndarray, probs_gen: np.ndarray,
                 probs_rec: np.ndarray, names: Sequence[str], **more_arrays: np.ndarray) -> None:
    """reports.jsonl (one line per item) and predictions.npz (arrays behind the metrics, with
    `more_arrays`)."""
    with open(out / "reports.jsonl", "w") as f:
        for it, g, greedy in zip(items, gen_reports, greedy_reports):
            f.write(json.dumps({"dicom_id": it.record.dicom_id, "study_id": it.record.study_id,
                                "reference": it.record.report, "generated": g,
                                "generated_greedy": greedy}) + "\n")
    np.savez(out / "predictions.npz", dicom_ids=np.array([it.record.dicom_id for it in items]),
             label_names=np.array(list(names)), label_values=np.stack([it.labels for it in items]),
             probs_generated=probs_gen, probs_reconstructed=probs_rec,
             generated_codes=np.asarray(gen_codes, np.int32), **more_arrays)
