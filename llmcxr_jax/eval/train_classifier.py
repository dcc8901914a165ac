"""Training the CXR classifier (`eval/classifier.py`) on a MIMIC-CXR-JPG-layout folder.

Data: `mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]` and `files/pXX/pSUBJECT/sSTUDY/*.jpg`
(the phantom world or the real MIMIC-CXR-JPG). Each image takes its study's CheXpert labels; by
default only frontal images (PA/AP) are used, the views generated images imitate. Images are read
once through `data/images.py` (the LLM-CXR transform at `size`) and kept in memory as 8-bit gray.

Labels: CheXpert 1 / 0 / -1 / blank. Blank means "not mentioned"; `blank='zeros'` reads it as
absent (the usual CheXpert training choice, and exact in the phantom world, where an unmentioned
finding is not drawn) and `blank='ignore'` masks it out of the loss. Uncertain -1 follows
`uncertain`: 'ones' (U-Ones; in the phantom world an uncertain finding is drawn subtly),
'zeros' (U-Zeros) or 'ignore' (masked). The loss is the masked mean binary cross-entropy.

One jitted step (AdamW, warmup + cosine, gradient clipping, on-device augmentation: shifts,
contrast / brightness, blur and noise, which also make it tolerant of VQ-GAN reconstructions),
periodic validation AUROC, and at the end the checkpoint (`classifier.save_classifier`) plus
`eval.json` with the per-finding test metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from llmcxr_jax import configs
from llmcxr_jax.data import mimic
from llmcxr_jax.data.images import ImageError, load_image
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.eval import classification_metrics as metrics
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.train.metrics import METRICS_FILE

CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
TRAIN_CONFIG_FILE = "train_config.json"
EVAL_FILE = "eval.json"


@dataclasses.dataclass(frozen=True)
class TrainClassifierConfig:
    """Defaults: the measured run (1,500-study phantom world at 128 px, 1,202 frontal training
    images; its time in README, Performance): test macro AUROC 0.907 on the drawn findings."""

    steps: int = 900
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    uncertain: str = "ones"  # 'ones' | 'zeros' | 'ignore'
    blank: str = "zeros"  # 'zeros' | 'ignore'
    frontal_only: bool = True
    augment: bool = True
    max_shift: float = 0.06  # random translation, fraction of the side
    blur_prob: float = 0.25  # chance of a random-strength [1, 2, 1] blur (VQ-GAN-like softness)
    seed: int = 0
    eval_every: int = 300  # validation AUROC every N steps (0: only at the end)
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.uncertain not in metrics.UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain={self.uncertain!r} not in {metrics.UNCERTAIN_POLICIES}")
        if self.blank not in metrics.BLANK_POLICIES:
            raise ValueError(f"blank={self.blank!r} not in {metrics.BLANK_POLICIES}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabeledImages:
    """Images of one split: uint8 gray [N, H, W, 1], CheXpert values [N, L] (NaN = blank), ids."""

    images: np.ndarray
    labels: np.ndarray
    dicom_ids: tuple[str, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def float_images(self, index: Any = slice(None)) -> np.ndarray:
        """[-1, 1] float32 of the selected images (one channel)."""
        return self.images[index].astype(np.float32) / 127.5 - 1.0


def _label_value(cell: str) -> float:
    if cell == "":
        return math.nan
    v = float(cell)
    if v not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {cell!r}")
    return v


def read_chexpert(root: str | pathlib.Path, names: Sequence[str], skips: SkipCounter
                  ) -> dict[str, np.ndarray]:
    """study_id -> CheXpert values [L] (NaN = blank) from ROOT/mimic-cxr-2.0.0-chexpert.csv[.gz]."""
    path = mimic.find_csv(root, CHEXPERT_CSV)
    out: dict[str, np.ndarray] = {}
    for line, row in mimic.read_csv_rows(path, ("subject_id", "study_id") + tuple(names), skips,
                                         may_be_empty=tuple(names)):
        try:
            out[row["study_id"]] = np.array([_label_value(row[n]) for n in names], np.float32)
        except ValueError as e:
            skips.add("malformed_csv_row", f"{path.name}:{line} ({e})")
    return out


def load_split(root: str | pathlib.Path, split: str, size: int, names: Sequence[str], *,
               frontal_only: bool = True, max_images: int | None = None,
               skips: SkipCounter | None = None, progress: bool = True) -> LabeledImages:
    """Every (frontal) image of `split` with its study's labels, sorted by dicom id.

    Images without a labels row or a readable file are skipped and counted in `skips`.
    """
    if split not in mimic.SPLITS:
        raise ValueError(f"split {split!r} not in {mimic.SPLITS}")
    skips = skips if skips is not None else SkipCounter("classifier images")
    labels = read_chexpert(root, names, skips)
    rows = sorted((r for r in mimic.read_split(root, skips).values() if r.split == split),
                  key=lambda r: r.dicom_id)
    if frontal_only:
        meta = mimic.read_metadata(root, skips)
        rows = [r for r in rows if r.dicom_id in meta and meta[r.dicom_id].view in mimic.FRONTAL_VIEWS]
    if max_images is not None:
        rows = rows[:max_images]
    images, values, ids = [], [], []
    for r in tqdm(rows, desc=f"read {split}", unit="img", disable=not progress, leave=False):
        if r.study_id not in labels:
            skips.add("no_chexpert_row", f"study {r.study_id}")
            continue
        try:
            x = load_image(mimic.image_path(root, r.subject_id, r.study_id, r.dicom_id), size)
        except ImageError as e:
            skips.add("unreadable_image", str(e))
            continue
        gray = np.round((np.clip(x.mean(-1), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
        images.append(gray[..., None])
        values.append(labels[r.study_id])
        ids.append(r.dicom_id)
    if not images:
        raise ValueError(f"{root}: no usable {'frontal ' if frontal_only else ''}images in split "
                         f"{split!r} ({skips.total} skipped: {dict(skips.counts)})")
    return LabeledImages(np.stack(images), np.stack(values), tuple(ids), tuple(names))


def targets(labels: np.ndarray, uncertain: str, blank: str) -> tuple[np.ndarray, np.ndarray]:
    """(binary targets, loss mask) float32 [N, L] under the label policies."""
    y, valid = metrics.binarize_chexpert(labels, uncertain, blank)
    return y.astype(np.float32), valid.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Augmentation (on device, inside the step)
# --------------------------------------------------------------------------------------------------


def _blur3(x: jax.Array) -> jax.Array:
    """Separable [1, 2, 1] / 4 blur with edge padding; x [B, H, W, C]."""
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h = (p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]) / 4
    return (h[:, :-2] + 2 * h[:, 1:-1] + h[:, 2:]) / 4


def augment(rng: jax.Array, x: jax.Array, max_shift: float, blur_prob: float = 0.25
            ) -> jax.Array:
    """Random translation (edge-padded), contrast / brightness, blur and noise; x in [-1, 1]."""
    b, h, w, _ = x.shape
    k_shift, k_c, k_b, k_blur, k_noise, k_sigma = jax.random.split(rng, 6)
    m = int(round(max_shift * max(h, w)))
    if m > 0:
        padded = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
        offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * m + 1)
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[2]))
        x = jax.vmap(crop)(padded, offsets)
    contrast = jax.random.uniform(k_c, (b, 1, 1, 1), minval=0.85, maxval=1.15)
    brightness = jax.random.uniform(k_b, (b, 1, 1, 1), minval=-0.1, maxval=0.1)
    x = x * contrast + brightness
    t = jax.random.uniform(k_blur, (b, 1, 1, 1)) * (
        jax.random.uniform(k_sigma, (b, 1, 1, 1)) < blur_prob)
    x = x + t * (_blur3(x) - x)
    sigma = jax.random.uniform(k_noise, (b, 1, 1, 1), maxval=0.03)
    x = x + sigma * jax.random.normal(jax.random.fold_in(k_noise, 1), x.shape)
    return jnp.clip(x, -1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def masked_bce(logits: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean binary cross-entropy over the unmasked cells."""
    loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), y)
    return jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_optimizer(cfg: TrainClassifierConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, min(cfg.warmup_steps, max(cfg.steps - 1, 0)), max(cfg.steps, 1),
        end_value=cfg.learning_rate * 0.01)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def make_train_step(model_cfg: clf.ClassifierConfig, cfg: TrainClassifierConfig,
                    tx: optax.GradientTransformation) -> Callable:
    """jitted (params, opt_state, rng, images, y, mask) -> (params, opt_state, loss)."""
    logits_of = clf.logits_fn(model_cfg)

    def step(params, opt_state, rng, images, y, mask):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        if cfg.augment:
            x = augment(rng, x, cfg.max_shift, cfg.blur_prob)
        loss, grads = jax.value_and_grad(lambda p: masked_bce(logits_of(p, x), y, mask))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def split_scores(model_cfg: clf.ClassifierConfig, params: Any, data: LabeledImages,
                 batch_size: int = 64, uncertain: str = "ones") -> tuple[np.ndarray, np.ndarray]:
    """(binary truth, probabilities) of a split's complete rows; blank = absent."""
    probs = clf.predict_proba(model_cfg, params, data.float_images(), batch_size)
    y, valid = metrics.binarize_chexpert(data.labels, uncertain, "zeros")
    keep = valid.all(1)
    return y[keep], probs[keep]


def evaluate_split(model_cfg: clf.ClassifierConfig, params: Any, data: LabeledImages,
                   batch_size: int = 64, uncertain: str = "ones",
                   threshold: float | Sequence[float] = 0.5) -> dict[str, Any]:
    """Per-finding AUROC / F1 (at `threshold`) of the classifier on a split; blank = absent."""
    y, probs = split_scores(model_cfg, params, data, batch_size, uncertain)
    return metrics.evaluate(y, probs, names=model_cfg.labels, threshold=threshold)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless epoch-shuffled index batches of exactly `batch_size` (epochs are concatenated, so
    a split smaller than a batch still fills it)."""
    order = rng.permutation(n)
    pos = 0
    while True:
        while pos + batch_size > len(order):
            order = np.concatenate([order[pos:], rng.permutation(n)])
            pos = 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def train(world: str | pathlib.Path, workdir: str | pathlib.Path,
          model_cfg: clf.ClassifierConfig = clf.ClassifierConfig(),
          cfg: TrainClassifierConfig = TrainClassifierConfig(), *,
          train_split: str = "train", eval_split: str = "validate", test_split: str | None = "test",
          max_images: int | None = None, progress: bool = True,
          log: Callable[[str], None] = print,
          stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Train on `train_split`, validate on `eval_split`, test on `test_split`; writes WORKDIR/
    {config.json, params.safetensors, thresholds.json, train_config.json, metrics.jsonl,
    eval.json}. `stop()`, asked after each step, ends it early: None, and no classifier saved.

    With an `eval_split`, per-label F1-optimal thresholds tuned on it are saved beside the
    checkpoint (thresholds.json) and the test split is also scored at them.
    Returns {'losses': [...], 'params': ..., 'eval': {split: metrics}, 'thresholds', ...}.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / TRAIN_CONFIG_FILE).write_text(json.dumps(
        {"world": str(world), "splits": {"train": train_split, "eval": eval_split,
                                         "test": test_split},
         "classifier": configs.to_dict(model_cfg), "train": configs.to_dict(cfg)},
        indent=2) + "\n")
    skips = SkipCounter("classifier images")
    read = dict(frontal_only=cfg.frontal_only, max_images=max_images, skips=skips,
                progress=progress)
    size = model_cfg.image_size
    data = {"train": load_split(world, train_split, size, model_cfg.labels, **read)}
    for name in (eval_split, test_split):
        if name:
            data[name] = load_split(world, name, size, model_cfg.labels, **read)
    log("classifier data: " + ", ".join(f"{k} {len(v)}" for k, v in data.items())
        + (f"; skipped {skips.total} ({dict(skips.counts)})" if skips.total else ""))
    y, mask = targets(data["train"].labels, cfg.uncertain, cfg.blank)
    tx = make_optimizer(cfg)
    params = jax.tree.map(jnp.asarray, clf.init_params(model_cfg, cfg.seed))
    opt_state = tx.init(params)
    step_fn = make_train_step(model_cfg, cfg, tx)
    rng = jax.random.key(cfg.seed + 1)
    batches = _batches(len(data["train"]), cfg.batch_size, np.random.default_rng(cfg.seed))
    losses: list[float] = []
    start = time.perf_counter()
    evals: dict[str, Any] = {}
    with open(workdir / METRICS_FILE, "w") as mfile, tqdm(total=cfg.steps, desc="classifier",
                                                          disable=not progress) as bar:
        for step in range(1, cfg.steps + 1):
            idx = next(batches)
            params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(rng, step),
                                              data["train"].images[idx], y[idx], mask[idx])
            loss = float(loss)
            losses.append(loss)
            record: dict[str, Any] = {"step": step, "loss": loss,
                                      "seconds": round(time.perf_counter() - start, 2)}
            if eval_split and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                r = evaluate_split(model_cfg, params, data[eval_split], cfg.eval_batch_size)
                record[f"{eval_split}_auroc_macro"] = r["auroc"]["macro"]
                evals[eval_split] = r
                log(f"step {step}: loss {np.mean(losses[-cfg.eval_every:]):.4f}, "
                    f"{eval_split} AUROC macro {metrics.fmt(r['auroc']['macro'])} "
                    f"micro {metrics.fmt(r['auroc']['micro'])}")
            mfile.write(json.dumps(record) + "\n")
            mfile.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if stop is not None and stop() and step < cfg.steps:
                log(f"classifier: stopped at step {step} of {cfg.steps}; not saved")
                return None
    seconds = time.perf_counter() - start
    clf.save_classifier(workdir, model_cfg, params)
    thresholds = None
    if eval_split:
        thresholds = metrics.best_f1_thresholds(*split_scores(
            model_cfg, params, data[eval_split], cfg.eval_batch_size))
        clf.save_thresholds(workdir, model_cfg, thresholds)
    if test_split:
        evals[test_split] = evaluate_split(model_cfg, params, data[test_split], cfg.eval_batch_size)
        log(f"{test_split} split ({evals[test_split]['n']} images):\n"
            + metrics.markdown_table(evals[test_split]))
        if thresholds is not None:
            tuned = evaluate_split(model_cfg, params, data[test_split], cfg.eval_batch_size,
                                   threshold=thresholds)
            evals[f"{test_split}_tuned_thresholds"] = tuned
            log(f"{test_split} F1 at {eval_split}-tuned thresholds: micro "
                f"{metrics.fmt(tuned['f1']['micro'])} macro {metrics.fmt(tuned['f1']['macro'])}")
    result = {"steps": cfg.steps, "train_seconds": round(seconds, 1), "eval": evals,
              "thresholds": None if thresholds is None else dict(zip(model_cfg.labels,
                                                                     thresholds.tolist())),
              "images": {k: len(v) for k, v in data.items()}, "skipped": dict(skips.counts)}
    (workdir / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return {"losses": losses, "params": params, **result}
