"""Writes a tiny MIMIC-CXR-JPG-layout world for the reader / TFDS / pipeline tests.

Real MIMIC report phrasing (FINAL REPORT header, "___" anonymisation, uppercase section headers,
reports without FINDINGS); CSVs with the real column order; small grayscale JPEGs.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import pathlib

import numpy as np

SPLIT_HEADER = ["dicom_id", "study_id", "subject_id", "split"]
METADATA_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                   "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                   "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                   "PatientOrientationCodeSequence_CodeMeaning"]

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""
REPORT_FULL_STAGE1 = ("There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral "
                      "nodular opacities that most likely represent nipple shadows. The "
                      "cardiomediastinal silhouette is normal. No acute cardiopulmonary process.")
REPORT_FULL_STAGE2 = "No acute cardiopulmonary process."

REPORT_IMPRESSION_ONLY = """                                 FINAL REPORT
 HISTORY:  ___-year-old male with chest pain.
 
 COMPARISON:  ___.
 
 IMPRESSION:  
 
 AP portable chest radiograph demonstrates stable moderate cardiomegaly.  No
 pneumothorax.
"""
REPORT_IMPRESSION_ONLY_TEXT = ("AP portable chest radiograph demonstrates stable moderate "
                               "cardiomegaly.  No pneumothorax.")

REPORT_NO_SECTION = """                                 FINAL REPORT
 INDICATION:  ___ with cough.
 
 CONCLUSION:  Lungs are clear. Findings were discussed with Dr. ___ at 9:15.
"""


@dataclasses.dataclass(frozen=True)
class Image:
    dicom_id: str
    subject_id: str
    study_id: str
    split: str = "train"
    view: str = "PA"
    date: int = 21800101
    time: float = 120000.0


def _write_csv(path: pathlib.Path, header: list[str], rows: list[list[str]],
               extra_lines: list[str] = ()) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    for line in extra_lines:
        buf.write(line + "\n")
    data = buf.getvalue().encode()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_world(root: pathlib.Path, images: list[Image], reports: dict[tuple[str, str], str], *,
                gz: bool = True, split_extra_lines: list[str] = (), image_size: int = 16,
                write_images: bool = True, seed: int = 0) -> pathlib.Path:
    """CSV files, reports (only those in `reports`) and JPEGs (one per image) under `root`."""
    from PIL import Image as PILImage

    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    _write_csv(root / f"mimic-cxr-2.0.0-split.csv{sfx}", SPLIT_HEADER,
               [[im.dicom_id, im.study_id, im.subject_id, im.split] for im in images],
               split_extra_lines)
    _write_csv(root / f"mimic-cxr-2.0.0-metadata.csv{sfx}", METADATA_HEADER,
               [[im.dicom_id, im.subject_id, im.study_id, "CHEST (PA AND LAT)", im.view, "16", "16",
                 str(im.date), f"{im.time:.3f}", "Chest 2V", "postero-anterior", "Erect"]
                for im in images])
    for (subject, study), text in reports.items():
        p = root / "reports" / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "reports").mkdir(exist_ok=True)
    if write_images:
        rng = np.random.default_rng(seed)
        for im in images:
            p = (root / "files" / f"p{im.subject_id[:2]}" / f"p{im.subject_id}" / f"s{im.study_id}"
                 / f"{im.dicom_id}.jpg")
            p.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (image_size, image_size), dtype=np.uint8)
            PILImage.fromarray(pixels, mode="L").save(p, quality=95)
    return root


def random_codes(dicom_ids, n: int = 256, codebook: int = 1024, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, codebook, n).astype(np.uint16) for d in dicom_ids}
