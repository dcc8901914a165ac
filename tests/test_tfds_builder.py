"""The MIMIC-CXR-JPG TFDS builder: array_record without TensorFlow, read back into grain."""

import io

import grain
import numpy as np
import pytest
from PIL import Image as PILImage

from llmcxr_jax.data import mimic
from llmcxr_jax.data.skips import SkipCounter
from tiny_mimic_world import (REPORT_FULL, REPORT_FULL_STAGE2, REPORT_IMPRESSION_ONLY, Image,
                              write_world)

tfds = pytest.importorskip("tensorflow_datasets")

IMAGES = [
    Image("d01", "10000001", "50000001", view="PA"),
    Image("d02", "10000001", "50000001", view="LATERAL"),
    Image("d03", "10000002", "50000002", view="AP"),
    Image("d04", "10000003", "50000003", view=""),  # report missing: kept with empty text
    Image("d05", "10000003", "50000004", split="test"),  # image file removed: skipped
    Image("d06", "10000004", "50000005", split="validate"),
]
REPORTS = {("10000001", "50000001"): REPORT_FULL, ("10000002", "50000002"): REPORT_IMPRESSION_ONLY,
           ("10000003", "50000004"): REPORT_FULL, ("10000004", "50000005"): REPORT_FULL}


def test_build_and_read_back_without_tensorflow(tmp_path):
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is None, "these tests must run without TF"
    from llmcxr_jax.data.tfds_builders import build_mimic_cxr_jpg

    root = write_world(tmp_path / "world", IMAGES, REPORTS, image_size=24)
    mimic.image_path(root, "10000003", "50000004", "d05").unlink()
    builder = build_mimic_cxr_jpg(root, tmp_path / "tfds")
    version_dir = tmp_path / "tfds" / "mimic_cxr_jpg" / "1.0.0"
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        "mimic_cxr_jpg-train.array_record-00000-of-00001",
        "mimic_cxr_jpg-validate.array_record-00000-of-00001"]
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 4, "validate": 1}

    # Registered by import: the generic tfds entry point finds it by name.
    source = tfds.data_source("mimic_cxr_jpg", split="train", data_dir=str(tmp_path / "tfds"),
                              download=False)
    assert len(source) == 4
    # Into grain as a random-access source.
    ds = grain.MapDataset.source(source).map(lambda ex: ex["dicom_id"].decode())
    assert sorted(ds) == ["d01", "d02", "d03", "d04"]

    by_id = {ex["dicom_id"].decode(): ex for ex in source}
    ex = by_id["d01"]
    assert ex["study_id"] == b"50000001" and ex["subject_id"] == b"10000001"
    assert ex["split"] == b"train" and ex["view"] == b"PA"
    assert ex["report"].decode() == REPORT_FULL
    assert ex["findings"].decode() == mimic.parse_findings(REPORT_FULL)
    assert ex["impression"].decode() == REPORT_FULL_STAGE2
    assert by_id["d02"]["view"] == b"LATERAL" and by_id["d04"]["view"] == b""
    assert by_id["d03"]["findings"] == b""  # impression-only report
    assert by_id["d04"]["report"] == b"" and by_id["d04"]["impression"] == b""
    # The image comes back as the file's pixels.
    for dicom_id, ex in by_id.items():
        row = next(im for im in IMAGES if im.dicom_id == dicom_id)
        path = mimic.image_path(root, row.subject_id, row.study_id, dicom_id)
        expected = np.asarray(PILImage.open(io.BytesIO(path.read_bytes())))
        assert ex["image"].shape == (24, 24, 1) and ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"][..., 0], expected)

    # A second build finds the prepared data and reuses it.
    mtime = (version_dir / "dataset_info.json").stat().st_mtime_ns
    build_mimic_cxr_jpg(root, tmp_path / "tfds")
    assert (version_dir / "dataset_info.json").stat().st_mtime_ns == mtime


def test_build_from_the_phantom_world(tmp_path):
    from llmcxr_jax.data.phantom_world import WorldConfig, write_world as write_phantoms
    from llmcxr_jax.data.tfds_builders import build_mimic_cxr_jpg

    root = tmp_path / "phantoms"
    write_phantoms(root, WorldConfig(n_studies=6, size=32, seed=1, n_instructions=4), workers=1,
                   progress=False)
    split = mimic.read_split(root, SkipCounter())
    meta = mimic.read_metadata(root, SkipCounter())
    builder = build_mimic_cxr_jpg(root, tmp_path / "tfds")
    counts = {}
    for row in split.values():
        counts[row.split] = counts.get(row.split, 0) + 1
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == counts
    for split_name in counts:
        for ex in builder.as_data_source(split=split_name):
            d = ex["dicom_id"].decode()
            row = split[d]
            assert ex["split"].decode() == split_name == row.split
            assert ex["view"].decode() == meta[d].view
            assert ex["image"].shape == (32, 32, 1)
            text = mimic.report_path(mimic.reports_root(root), row.subject_id,
                                     row.study_id).read_text()
            assert ex["impression"].decode() == (mimic.parse_impression(text) or "")
            assert ex["findings"].decode() == (mimic.parse_findings(text) or "")
