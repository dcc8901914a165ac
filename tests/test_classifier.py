"""CXR classifier: data loading from a tiny phantom world, a short training, checkpoint round trip."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmcxr_jax.data.findings import CHEXPERT_LABELS, PHANTOM_DRAWN_LABELS
from llmcxr_jax.data.images import load_image
from llmcxr_jax.data.mimic import image_path
from llmcxr_jax.data.phantom_world import WorldConfig, write_world
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.eval import train_classifier as tc

SIZE = 64
TINY = clf.ClassifierConfig(widths=(8, 16), groups=4, image_size=SIZE)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "world"
    write_world(out, WorldConfig(n_studies=40, size=SIZE, seed=5, n_instructions=5), workers=1,
                progress=False)
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clf_run")
    cfg = tc.TrainClassifierConfig(steps=40, batch_size=8, learning_rate=3e-3, eval_every=0,
                                   warmup_steps=5, augment=False, eval_batch_size=4)
    result = tc.train(world, workdir, TINY, cfg, eval_split="validate", test_split="train",
                      progress=False, log=lambda s: None)
    return workdir, result


def test_load_split_matches_ground_truth(world):
    data = tc.load_split(world, "train", SIZE, PHANTOM_DRAWN_LABELS, progress=False)
    records = [json.loads(line) for line in (world / "phantom_labels.jsonl").read_text().splitlines()]
    frontal = {}
    for r in records:
        if r["split"] == "train":
            for dicom, view in zip(r["dicom_ids"], r["views"]):
                if view in ("PA", "AP"):
                    frontal[dicom] = r
    assert sorted(frontal) == list(data.dicom_ids)
    assert data.images.shape == (len(frontal), SIZE, SIZE, 1) and data.images.dtype == np.uint8
    for i, dicom in enumerate(data.dicom_ids):
        truth = frontal[dicom]["labels"]
        expect = [math.nan if truth[n] is None else truth[n] for n in PHANTOM_DRAWN_LABELS]
        np.testing.assert_array_equal(data.labels[i], np.array(expect, np.float32))
    r = frontal[data.dicom_ids[0]]
    x = load_image(image_path(world, str(r["subject_id"]), str(r["study_id"]), data.dicom_ids[0]),
                   SIZE)
    np.testing.assert_allclose(data.float_images(0)[..., 0], x.mean(-1), atol=1 / 127.5)
    everything = tc.load_split(world, "train", SIZE, CHEXPERT_LABELS, frontal_only=False,
                               progress=False)
    assert len(everything) == sum(len(r["dicom_ids"]) for r in records if r["split"] == "train")


def test_targets_and_masked_bce():
    labels = np.array([[1, 0, -1, np.nan], [np.nan, -1, 1, 0]], np.float32)
    y, mask = tc.targets(labels, "ignore", "ignore")
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [0, 0, 1, 1]])
    logits = jnp.array([[2.0, -1.0, 0.3, 5.0], [0.0, 1.0, -0.5, 0.2]])
    p = 1 / (1 + np.exp(-np.asarray(logits)))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    expect = (bce * mask).sum() / mask.sum()
    assert float(tc.masked_bce(logits, jnp.asarray(y), jnp.asarray(mask))) == pytest.approx(
        expect, rel=1e-5)


def test_augment_keeps_shape_and_range():
    x = jnp.linspace(-1, 1, 2 * 32 * 32).reshape(2, 32, 32, 1)
    out = jax.jit(tc.augment, static_argnums=2)(jax.random.key(0), x, 0.1)
    assert out.shape == x.shape and float(out.min()) >= -1 and float(out.max()) <= 1
    assert not np.allclose(out, x)


def test_training_reduces_loss_and_writes_checkpoint(trained):
    workdir, result = trained
    losses = result["losses"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4])
    for name in ("config.json", "params.safetensors", "train_config.json", "metrics.jsonl",
                 "eval.json"):
        assert (workdir / name).is_file(), name
    evals = json.loads((workdir / "eval.json").read_text())["eval"]
    assert set(evals["train"]["per_finding"]) == set(PHANTOM_DRAWN_LABELS)
    assert "train_tuned_thresholds" in evals
    th = clf.load_thresholds(workdir, TINY)
    assert th.shape == (len(TINY.labels),) and np.isfinite(th).all()


def test_checkpoint_round_trip_and_features(trained, world):
    workdir, result = trained
    config, params = clf.load_classifier(workdir)
    assert config == TINY
    data = tc.load_split(world, "validate", SIZE, TINY.labels, progress=False)
    gray = data.float_images(slice(0, 5))  # [5, H, W, 1], as the evaluation feeds it
    ours = clf.predict_proba(TINY, result["params"], gray, batch_size=4)
    back = clf.predict_proba(config, params, gray, batch_size=4)
    np.testing.assert_array_equal(ours, back)
    assert ours.shape == (5, len(TINY.labels)) and ((ours > 0) & (ours < 1)).all()
    fn, p2, _ = clf.load_feature_net(workdir)
    f = clf.extract_features(config, p2, np.repeat(gray, 3, axis=-1), batch_size=4)
    assert f.shape == (5, TINY.feature_dim)
    # Gray replicated into RGB or given as one channel: the same image.
    np.testing.assert_allclose(clf.extract_features(config, p2, gray, batch_size=4), f, atol=1e-5)
    # The clinical loss's use at another size: gradients flow through the features to the image.
    g = jax.jit(jax.grad(lambda im: jnp.sum(fn(p2, im) ** 2)))(jnp.asarray(gray[:1, :48, :40]))
    assert g.shape == (1, 48, 40, 1) and float(jnp.abs(g).sum()) > 0


def test_checkpoint_errors(trained, tmp_path):
    workdir, result = trained
    with pytest.raises(FileNotFoundError, match="config.json"):
        clf.load_classifier(tmp_path)
    other = clf.ClassifierConfig(widths=(8, 32), groups=4, image_size=SIZE)
    bad = tmp_path / "bad"
    clf.save_classifier(bad, TINY, result["params"])
    (bad / "config.json").write_text(json.dumps({**json.loads((bad / "config.json").read_text()),
                                                 "widths": list(other.widths)}))
    with pytest.raises(ValueError, match="shape mismatch"):
        clf.load_classifier(bad)
    (bad / "params.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        clf.load_classifier(bad)
    with pytest.raises(ValueError, match="not CheXpert labels"):
        clf.ClassifierConfig(labels=("Nodule",))


def test_batches_are_full_epochs():
    it = tc._batches(10, 4, np.random.default_rng(0))
    seen = np.concatenate([next(it) for _ in range(5)])  # two epochs exactly
    np.testing.assert_array_equal(np.bincount(seen), np.full(10, 2))
    small = tc._batches(3, 8, np.random.default_rng(0))  # split smaller than a batch
    assert all(len(next(small)) == 8 for _ in range(3))
