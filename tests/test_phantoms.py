"""Phantom radiographs: shape, determinism, and that every finding is visible at 128 px."""

import numpy as np
import pytest

from llmcxr_jax.data.findings import FINDING_ATTRIBUTES, UNCERTAIN, Finding, StudyFindings
from llmcxr_jax.data.phantoms import Anatomy, render, sample_findings

ANATOMY = Anatomy.sample(np.random.default_rng(7))


def _mild(label: str, certainty: int = 1, side: str = "right") -> Finding:
    attrs = FINDING_ATTRIBUTES[label]
    kw = {}
    if "side" in attrs:
        kw["side"] = side
    if "zone" in attrs:
        kw["zone"] = "upper"
    if "severity" in attrs:
        kw["severity"] = "mild"
    if "device" in attrs:
        kw["device"] = "central_line"
    return Finding(label, certainty, **kw)


def test_render_shape_dtype_and_determinism():
    sf = sample_findings(np.random.default_rng(0))
    for view in ("PA", "AP", "LATERAL"):
        a = render(sf, ANATOMY, view, 64, seed=5)
        assert a.shape == (64, 64) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, render(sf, ANATOMY, view, 64, seed=5))
        assert not np.array_equal(a, render(sf, ANATOMY, view, 64, seed=6))
        assert a.std() > 30  # a real image, not a flat field
    with pytest.raises(ValueError, match="view"):
        render(sf, ANATOMY, "OBLIQUE", 64)


def test_frontal_anatomy_lungs_darker_than_mediastinum():
    img = render(StudyFindings(()), ANATOMY, "PA", 128, seed=1).astype(float)
    lungs = np.r_[img[40:80, 20:40].ravel(), img[40:80, 88:108].ravel()].mean()
    mediastinum = img[30:60, 60:68].mean()
    abdomen = img[118:126, 30:100].mean()
    background = img[120:, :3].mean()
    assert mediastinum > lungs + 40 and abdomen > lungs + 40 and background < lungs


@pytest.mark.parametrize("label", [l for l in FINDING_ATTRIBUTES if l != "Pneumonia"])
def test_every_finding_visible_at_128px(label):
    """Same seed with and without a mild finding: the difference is a clear local contrast.

    At 128 px, pooled in 4x4 blocks, a mild finding changes at least three blocks by more than
    8 gray levels and one by more than 20 (the film noise is identical in both renders).
    """
    for view in ("PA", "AP"):
        for side in ("right", "left"):
            base = render(StudyFindings(()), ANATOMY, view, 128, seed=3).astype(np.float32)
            img = render(StudyFindings((_mild(label, side=side),)), ANATOMY, view, 128,
                         seed=3).astype(np.float32)
            diff = np.abs(img - base).reshape(32, 4, 32, 4).mean((1, 3))
            assert diff.max() > 20, (label, view, side, diff.max())
            assert (diff > 8).sum() >= 3, (label, view, side, (diff > 8).sum())


def test_laterality_is_drawn_on_the_named_side():
    """Patient's right is the image left on a frontal view."""
    base = render(StudyFindings(()), ANATOMY, "PA", 128, seed=3).astype(np.float32)
    for label in ("Pleural Effusion", "Pneumothorax", "Consolidation", "Atelectasis"):
        for side, half in (("right", slice(0, 64)), ("left", slice(64, 128))):
            img = render(StudyFindings((_mild(label, side=side),)), ANATOMY, "PA", 128,
                         seed=3).astype(np.float32)
            diff = np.abs(img - base)
            other = slice(64, 128) if half.start == 0 else slice(0, 64)
            assert diff[:, half].sum() > 5 * diff[:, other].sum(), (label, side)


def test_severity_and_cardiomegaly_scale():
    def change(f):
        base = render(StudyFindings(()), ANATOMY, "PA", 128, seed=3).astype(np.float32)
        img = render(StudyFindings((f,)), ANATOMY, "PA", 128, seed=3).astype(np.float32)
        return (np.abs(img - base) > 10).sum()

    for label in ("Pleural Effusion", "Cardiomegaly", "Consolidation", "Pneumothorax"):
        sizes = [change(Finding(**{**_mild(label).__dict__, "severity": s}))
                 for s in ("mild", "moderate", "severe")]
        assert sizes[0] < sizes[1] < sizes[2], (label, sizes)


def test_sampled_findings_are_valid_and_varied():
    rng = np.random.default_rng(0)
    studies = [sample_findings(rng, "AP" if i % 3 == 0 else "PA") for i in range(400)]
    labels = [s.labels() for s in studies]
    normal = sum(l["No Finding"] == 1 for l in labels) / len(labels)
    assert 0.2 < normal < 0.5
    for name in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Support Devices", "Edema"):
        assert any(l[name] == 1 for l in labels), name
        assert any(l[name] == 0 for l in labels) or name == "Support Devices", name
    assert any(f.certainty == UNCERTAIN for s in studies for f in s.findings)
