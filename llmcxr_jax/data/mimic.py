"""MIMIC-CXR-JPG reader: split/metadata CSVs, report sections, stage-2 selection, image codes.

One reader serves the real data set and the phantom world, which is written in the same layout:

    ROOT/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split
    ROOT/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition,
                                             StudyDate, StudyTime, ...
    ROOT/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
    REPORTS/files/pXX/pSUBJECT/sSTUDY.txt    REPORTS = ROOT/reports if it exists, else ROOT

Report parsing follows the original LLM-CXR code (hyn2028/llm-cxr,
`training/mimiccxr_vq_dataset.py`, `_parse_report_fi` / `_parse_report_i`) exactly:

* the report's non-blank lines are stripped and joined with single spaces;
* stage 1: if the text splits on the literal, case-sensitive ``"FINDINGS:"`` into exactly two parts,
  the part after it is taken; if that part splits on ``"IMPRESSION:"`` into exactly two parts, the
  report is ``findings.strip() + " " + impression.strip()``, otherwise the whole part after
  ``FINDINGS:`` (stripped). If ``FINDINGS:`` does not occur exactly once, the whole text must split
  on ``"IMPRESSION:"`` into exactly two parts and the report is the impression (stripped);
  otherwise the record has neither section and is skipped.
* stage 2: the whole text must split on ``"IMPRESSION:"`` into exactly two parts; the report is
  the part after it, stripped.

Where we differ, on purpose: a parse that is empty after stripping (``"FINDINGS:"`` at the very
end) is skipped as ``empty_report`` instead of training on an empty report.

Stage 2's subset (the original reads it from a pickle, `...-selected-pa-ap-earlist-study.pickle`)
is computed from the metadata: among images with ViewPosition PA or AP, each subject's earliest
study by (StudyDate, StudyTime), ties broken by the smaller study_id; every PA/AP image of that
study is selected.

Direction parity: the original gives pair ``i`` of the sorted dicom ids of the split (after
removing ids whose codes are malformed) the direction image -> report when ``i`` is even. Each
record keeps that index as ``pair_index`` so the prompt builder can reproduce it.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import pathlib
from typing import Iterator, Mapping, Sequence

import numpy as np

from llmcxr_jax.data.skips import SkipCounter

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")
FRONTAL_VIEWS = ("PA", "AP")
SPLITS = ("train", "validate", "test")
CODES_SOURCE = "image codes (data.codes)"  # the source named when many images have no usable codes


# --------------------------------------------------------------------------------------------------
# CSV files
# --------------------------------------------------------------------------------------------------


def find_csv(root: str | pathlib.Path, name: str) -> pathlib.Path:
    """`ROOT/name.gz` or `ROOT/name`; a clear error naming both if neither exists."""
    root = pathlib.Path(root)
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"neither {root / name}.gz nor {root / name} exists")


def _open_text(path: pathlib.Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_csv_rows(path: str | pathlib.Path, required: Sequence[str], skips: SkipCounter,
                  may_be_empty: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (line number, row dict) of a plain or gzipped CSV with a header.

    A missing required column raises naming the file. A row whose field count differs from the
    header's, or whose required fields are empty, is skipped and counted as `malformed_csv_row`
    with `file:line`.
    """
    path = pathlib.Path(path)
    source = str(path)
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty CSV, expected a header with {list(required)}") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        index = {name: i for i, name in enumerate(header)}
        need = [index[c] for c in required if c not in may_be_empty]
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a NUL byte or an unterminated quote
                skips.saw(source)
                skips.add("malformed_csv_row", f"{path.name}:{reader.line_num} ({e})", source)
                continue
            line = reader.line_num
            if not fields:  # blank line
                continue
            skips.saw(source)
            if len(fields) != len(header) or any(not fields[i].strip() for i in need):
                skips.add("malformed_csv_row", f"{path.name}:{line}", source)
                continue
            yield line, {name: fields[i].strip() for name, i in index.items()}


@dataclasses.dataclass(frozen=True)
class SplitRow:
    dicom_id: str
    subject_id: str
    study_id: str
    split: str


@dataclasses.dataclass(frozen=True)
class MetadataRow:
    dicom_id: str
    subject_id: str
    study_id: str
    view: str  # ViewPosition; "" where the metadata has none
    study_date: int  # YYYYMMDD (shifted in MIMIC)
    study_time: float  # HHMMSS.fff


def read_split(root: str | pathlib.Path, skips: SkipCounter) -> dict[str, SplitRow]:
    """dicom_id -> SplitRow from ROOT/mimic-cxr-2.0.0-split.csv[.gz]."""
    path = find_csv(root, SPLIT_CSV)
    out: dict[str, SplitRow] = {}
    for line, row in read_csv_rows(path, SPLIT_COLUMNS, skips):
        if row["split"] not in SPLITS:
            skips.add("malformed_csv_row", f"{path.name}:{line} (split {row['split']!r})",
                      str(path))
            continue
        out[row["dicom_id"]] = SplitRow(row["dicom_id"], row["subject_id"], row["study_id"],
                                        row["split"])
    return out


def read_metadata(root: str | pathlib.Path, skips: SkipCounter) -> dict[str, MetadataRow]:
    """dicom_id -> MetadataRow from ROOT/mimic-cxr-2.0.0-metadata.csv[.gz].

    ViewPosition may be empty (it is for some real images); StudyDate/StudyTime must be numbers.
    """
    path = find_csv(root, METADATA_CSV)
    out: dict[str, MetadataRow] = {}
    for line, row in read_csv_rows(path, METADATA_COLUMNS, skips, may_be_empty=("ViewPosition",)):
        try:
            date, time = int(float(row["StudyDate"])), float(row["StudyTime"])
        except ValueError:
            skips.add("malformed_csv_row", f"{path.name}:{line} (StudyDate/StudyTime)",
                      str(path))
            continue
        out[row["dicom_id"]] = MetadataRow(row["dicom_id"], row["subject_id"], row["study_id"],
                                           row["ViewPosition"], date, time)
    return out


def select_stage2(metadata: Mapping[str, MetadataRow]) -> set[str]:
    """Stage 2's dicom ids: PA/AP images of each subject's earliest study (by date, then time)."""
    earliest: dict[str, tuple[int, float, int, str]] = {}
    for row in metadata.values():
        if row.view not in FRONTAL_VIEWS:
            continue
        key = (row.study_date, row.study_time, _as_int(row.study_id), row.study_id)
        if row.subject_id not in earliest or key < earliest[row.subject_id]:
            earliest[row.subject_id] = key
    chosen = {(subject, key[3]) for subject, key in earliest.items()}
    return {d for d, row in metadata.items()
            if row.view in FRONTAL_VIEWS and (row.subject_id, row.study_id) in chosen}


def _as_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        return 0


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def join_report_lines(text: str) -> str:
    """The original's normalisation: non-blank lines, stripped, joined by single spaces."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip() != "")


def parse_findings_impression(text: str) -> str | None:
    """Stage 1: FINDINGS + IMPRESSION, else IMPRESSION alone, else None (see module docstring)."""
    txt = join_report_lines(text)
    parts = txt.split("FINDINGS:")
    if len(parts) == 2:
        after = parts[1].strip()
        f_i = after.split("IMPRESSION:")
        if len(f_i) == 2:
            return f_i[0].strip() + " " + f_i[1].strip()
        return after
    return parse_impression(txt)


def parse_impression(text: str) -> str | None:
    """Stage 2: the text after the one 'IMPRESSION:', or None if it does not occur exactly once."""
    parts = join_report_lines(text).strip().split("IMPRESSION:")
    if len(parts) != 2:
        return None
    return parts[1].strip()


def parse_findings(text: str) -> str | None:
    """The FINDINGS section alone: after the one 'FINDINGS:', up to a single 'IMPRESSION:'."""
    parts = join_report_lines(text).split("FINDINGS:")
    if len(parts) != 2:
        return None
    after = parts[1].strip()
    f_i = after.split("IMPRESSION:")
    return f_i[0].strip() if len(f_i) == 2 else after


def parse_report(text: str, stage: int) -> str | None:
    """The training report text for `stage` (1 or 2), or None if the report has no such section."""
    if stage == 1:
        return parse_findings_impression(text)
    if stage == 2:
        return parse_impression(text)
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def reports_root(root: str | pathlib.Path) -> pathlib.Path:
    """Where `files/pXX/...txt` reports live: ROOT/reports if it exists (our layout), else ROOT."""
    root = pathlib.Path(root)
    return root / "reports" if (root / "reports").is_dir() else root


def _subject_dirs(subject_id: str) -> tuple[str, str]:
    p = f"p{subject_id}"
    return p[:3], p


def report_path(reports: pathlib.Path, subject_id: str, study_id: str) -> pathlib.Path:
    """REPORTS/files/pXX/pSUBJECT/sSTUDY.txt, as the original builds it."""
    group, subject = _subject_dirs(subject_id)
    return reports / "files" / group / subject / f"s{study_id}.txt"


def image_path(root: str | pathlib.Path, subject_id: str, study_id: str,
               dicom_id: str) -> pathlib.Path:
    """ROOT/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg (MIMIC-CXR-JPG's layout)."""
    group, subject = _subject_dirs(subject_id)
    return pathlib.Path(root) / "files" / group / subject / f"s{study_id}" / f"{dicom_id}.jpg"


# --------------------------------------------------------------------------------------------------
# Image codes
# --------------------------------------------------------------------------------------------------


def code_error(codes: np.ndarray, tokens_per_image: int, codebook_size: int) -> str | None:
    """Why `codes` cannot be used ('wrong_length' / 'out_of_range'), or None if they can."""
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.shape[0] != tokens_per_image:
        return "codes_wrong_length"
    if codes.size and (not np.issubdtype(codes.dtype, np.integer)
                       or codes.min() < 0 or codes.max() >= codebook_size):
        return "codes_out_of_range"
    return None


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MimicRecord:
    """One image-report pair ready for the prompt builders."""

    dicom_id: str
    subject_id: str
    study_id: str
    split: str
    report: str  # the stage's parsed report text
    codes: np.ndarray  # uint16 [tokens_per_image], values < codebook size
    pair_index: int  # the original's index for the direction parity


@dataclasses.dataclass
class MimicData:
    records: list[MimicRecord]
    skips: SkipCounter

    def by_study(self) -> dict[tuple[str, str], list[MimicRecord]]:
        """(subject_id, study_id) -> records of that study (for joining VQA)."""
        out: dict[tuple[str, str], list[MimicRecord]] = {}
        for r in self.records:
            out.setdefault((r.subject_id, r.study_id), []).append(r)
        return out


def load_mimic(root: str | pathlib.Path, codes: Mapping[str, np.ndarray], *, stage: int,
               splits: Sequence[str] = ("train",), tokens_per_image: int = 256,
               codebook_size: int = 1024, stage2_subset: set[str] | None = None) -> MimicData:
    """Image-report pairs of `splits` for `stage`, joined with `codes` by dicom_id.

    Skips (each record counted once, under the first reason, in the original's order):
    `codes_wrong_length` / `codes_out_of_range`, `codes_missing`, `report_missing`,
    `no_section` (neither FINDINGS nor IMPRESSION for stage 1, no IMPRESSION for stage 2),
    `empty_report`; CSV problems as `malformed_csv_row`. Images outside stage 2's subset are
    counted as `not_in_stage2_subset` (a filter, not an error).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    bad_splits = [s for s in splits if s not in SPLITS]
    if bad_splits:
        raise ValueError(f"unknown split(s) {bad_splits}; known: {list(SPLITS)}")
    root = pathlib.Path(root)
    skips = SkipCounter(f"MIMIC-CXR stage {stage} {'+'.join(splits)}")
    split_rows = read_split(root, skips)
    if stage == 2 and stage2_subset is None:
        stage2_subset = select_stage2(read_metadata(root, skips))
    reports = reports_root(root)

    # The original removes ids with malformed codes before assigning the direction parity.
    rows = {d: r for d, r in split_rows.items() if r.split in splits}
    bad_codes: dict[str, str] = {}
    for d in rows:
        if d in codes:
            err = code_error(codes[d], tokens_per_image, codebook_size)
            if err:
                bad_codes[d] = err
    for d, err in sorted(bad_codes.items()):
        skips.saw(CODES_SOURCE)
        skips.add(err, d, CODES_SOURCE)

    records: list[MimicRecord] = []
    parsed: dict[tuple[str, str], tuple[str, str]] = {}  # per study: (status, text), parsed once
    for pair_index, dicom_id in enumerate(sorted(set(rows) - set(bad_codes))):
        row = rows[dicom_id]
        if stage == 2 and dicom_id not in stage2_subset:
            skips.add("not_in_stage2_subset")
            continue
        skips.saw(CODES_SOURCE)
        if dicom_id not in codes:
            skips.add("codes_missing", dicom_id, CODES_SOURCE)
            continue
        path = report_path(reports, row.subject_id, row.study_id)
        key = (row.subject_id, row.study_id)
        if key not in parsed:
            parsed[key] = _read_and_parse(path, stage)
        status, report = parsed[key]
        skips.saw(str(reports))
        if status != "ok":
            skips.add(status, str(path), str(reports))
            continue
        records.append(MimicRecord(dicom_id, row.subject_id, row.study_id, row.split, report,
                                   np.asarray(codes[dicom_id], dtype=np.uint16), pair_index))
    return MimicData(records, skips)


def load_images(root: str | pathlib.Path, codes: Mapping[str, np.ndarray], *,
                splits: Sequence[str] = ("train",), stage2_only: bool = False,
                tokens_per_image: int = 256, codebook_size: int = 1024) -> MimicData:
    """Images of `splits` (optionally only stage 2's subset) with valid codes, without reports.

    For sources that bring their own text, e.g. VQA (`report` is ""). Skips as `load_mimic`:
    `codes_wrong_length` / `codes_out_of_range` / `codes_missing`, `not_in_stage2_subset`.
    """
    root = pathlib.Path(root)
    skips = SkipCounter(f"MIMIC-CXR images {'+'.join(splits)}")
    rows = {d: r for d, r in read_split(root, skips).items() if r.split in splits}
    subset = select_stage2(read_metadata(root, skips)) if stage2_only else None
    records: list[MimicRecord] = []
    for pair_index, dicom_id in enumerate(sorted(rows)):
        row = rows[dicom_id]
        if subset is not None and dicom_id not in subset:
            skips.add("not_in_stage2_subset")
            continue
        skips.saw(CODES_SOURCE)
        if dicom_id not in codes:
            skips.add("codes_missing", dicom_id, CODES_SOURCE)
            continue
        err = code_error(codes[dicom_id], tokens_per_image, codebook_size)
        if err:
            skips.add(err, dicom_id, CODES_SOURCE)
            continue
        records.append(MimicRecord(dicom_id, row.subject_id, row.study_id, row.split, "",
                                   np.asarray(codes[dicom_id], dtype=np.uint16), pair_index))
    return MimicData(records, skips)


def _read_and_parse(path: pathlib.Path, stage: int) -> tuple[str, str]:
    """('ok', report) or (skip reason, '') for the report file at `path`."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "report_missing", ""
    report = parse_report(text, stage)
    if report is None:
        return "no_section", ""
    if not report.strip():
        return "empty_report", ""
    return "ok", report
