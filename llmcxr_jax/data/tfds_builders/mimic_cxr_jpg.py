"""TFDS builder for MIMIC-CXR-JPG (manual download), array_record output, no TensorFlow needed.

MIMIC-CXR-JPG needs PhysioNet credentials, so the data are a manual download: `manual_dir` is the
world root in MIMIC-CXR-JPG's layout (see `llmcxr_jax.data.mimic`), the real data set or the
phantom world alike. One example per image (keyed by dicom_id):

    image       the JPEG file's bytes, stored as they are (no re-encoding), shape (None, None, 1)
    report      the full report text ("" where the report file is missing)
    findings    the FINDINGS section as the original parser cuts it ("" if none)
    impression  the IMPRESSION section (stage 2's text; "" if none)
    dicom_id, study_id, subject_id, view (ViewPosition, "" if unknown), split

Build and read back without TensorFlow (array_record is the only file format that allows it; the
TFRecord path and `as_dataset()` need TF):

    builder = MimicCxrJpg(data_dir=DATA_DIR, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=ROOT))
    source = builder.as_data_source(split="train")      # or tfds.data_source("mimic_cxr_jpg", ...)
    grain.MapDataset.source(source)                      # a random-access grain source

Without TF, as measured with tfds 4.9.10: text features come back as `bytes` (decode them), the
image as a uint8 array decoded by PIL (tfds warns that OpenCV is absent; harmless), and preparing a
builder needs the small `importlib_resources` package (in pyproject.toml), which tfds imports
lazily and which nothing else installs when TF is absent. `as_dataset()` and TFRecord output do
need TF; nothing here uses them.

Images whose file is missing are skipped and counted (logged); a split left without images is not
written. A missing report keeps the image with empty texts (counted and logged).
"""

from __future__ import annotations

import logging
import pathlib

import tensorflow_datasets as tfds

from llmcxr_jax.data import mimic
from llmcxr_jax.data.skips import SkipCounter

log = logging.getLogger(__name__)

_DESCRIPTION = """\
MIMIC-CXR-JPG chest radiographs with their free-text reports (FINDINGS / IMPRESSION parsed as
LLM-CXR does), split and view position from the data set's CSV files.
"""

_MANUAL = """\
Download MIMIC-CXR-JPG 2.0.0 (https://physionet.org/content/mimic-cxr-jpg/2.0.0/) and the reports
(mimic-cxr-reports.zip from MIMIC-CXR 2.0.0), and pass their root as manual_dir:
  ROOT/mimic-cxr-2.0.0-split.csv[.gz], ROOT/mimic-cxr-2.0.0-metadata.csv[.gz],
  ROOT/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg, and the reports at ROOT/reports/files/...txt
  (or ROOT/files/...txt). The phantom world (launch/make_phantoms.py) is written in this layout.
"""


def _text() -> tfds.features.Text:
    return tfds.features.Text()


class MimicCxrJpg(tfds.core.GeneratorBasedBuilder):
    """MIMIC-CXR-JPG images, reports and metadata as a TFDS data set."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images, report sections, ids, view and split."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 1), encoding_format="jpeg"),
                "report": _text(),
                "findings": _text(),
                "impression": _text(),
                "dicom_id": _text(),
                "study_id": _text(),
                "subject_id": _text(),
                "view": _text(),
                "split": _text(),
            }),
            homepage="https://physionet.org/content/mimic-cxr-jpg/2.0.0/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = pathlib.Path(dl_manager.manual_dir)
        skips = SkipCounter(f"MIMIC-CXR-JPG at {root}")
        split_rows = mimic.read_split(root, skips)
        meta = mimic.read_metadata(root, skips)
        by_split: dict[str, list[mimic.SplitRow]] = {}
        for dicom_id in sorted(split_rows):
            row = split_rows[dicom_id]
            image = mimic.image_path(root, row.subject_id, row.study_id, dicom_id)
            if image.is_file():
                by_split.setdefault(row.split, []).append(row)
            else:
                skips.add("image_missing", str(image))
        if skips.total:
            log.warning("%s", skips.summary())
        if not by_split:
            raise FileNotFoundError(f"no images of {root / mimic.SPLIT_CSV} found under {root}/files")
        return {split: self._generate_examples(root, rows, meta)
                for split, rows in sorted(by_split.items())}

    def _generate_examples(self, root: pathlib.Path, rows: list[mimic.SplitRow],
                           meta: dict[str, mimic.MetadataRow]):
        reports = mimic.reports_root(root)
        missing = SkipCounter("MIMIC-CXR-JPG reports")
        for row in rows:
            path = mimic.report_path(reports, row.subject_id, row.study_id)
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                missing.add("report_missing (kept, empty report)", str(path))
                text = ""
            image = mimic.image_path(root, row.subject_id, row.study_id, row.dicom_id)
            yield row.dicom_id, {
                "image": image.read_bytes(),
                "report": text,
                "findings": mimic.parse_findings(text) or "",
                "impression": mimic.parse_impression(text) or "",
                "dicom_id": row.dicom_id,
                "study_id": row.study_id,
                "subject_id": row.subject_id,
                "view": meta[row.dicom_id].view if row.dicom_id in meta else "",
                "split": row.split,
            }
        if missing.total:
            log.warning("%s", missing.summary())


def build(manual_dir: str | pathlib.Path, data_dir: str | pathlib.Path) -> MimicCxrJpg:
    """Prepares the data set from `manual_dir` into `data_dir` (array_record) and returns the builder.

    A second call finds the prepared data and does nothing.
    """
    builder = MimicCxrJpg(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder
