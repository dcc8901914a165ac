"""Report sets on disk for the labeler: CSV / JSONL / a folder of .txt in, a label CSV out.

Records without a report, JSONL lines that are not JSON objects, malformed CSV rows and unreadable
files are skipped and counted (`data.skips.SkipCounter`) with their line number or path.
"""

from __future__ import annotations

import csv
import gzip
import os
import pathlib
from typing import Iterable, Iterator, Mapping, Optional

from llmcxr_jax.data.jsonl import iter_jsonl
from llmcxr_jax.data.labeler import LABELS, Label, to_row
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.io_utils import atomic_write


def read_reports(path: str | os.PathLike, skips: Optional[SkipCounter] = None
                 ) -> Iterator[tuple[str, str]]:
    """Yield (id, report) from a CSV (`report`, optional `id` column), a JSONL (`report`, optional
    `id` field; `.gz` too) or a folder of `.txt` files (id = relative path without `.txt`).

    Raises FileNotFoundError / ValueError for a missing path or a file it cannot read as a set.
    """
    skips = skips if skips is not None else SkipCounter("reports")
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _read_folder(path, skips)
        return
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".jsonl.gz", ".json"):
        yield from _read_jsonl(path, skips)
    elif suffix in (".csv", ".csv.gz"):
        yield from _read_csv(path, skips)
    else:
        raise ValueError(f"{path}: expected a .csv, .jsonl or a folder of .txt reports")


def _read_folder(path: pathlib.Path, skips: SkipCounter) -> Iterator[tuple[str, str]]:
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise ValueError(f"{path}: folder holds no .txt reports")
    for f in files:
        rid = f.relative_to(path).with_suffix("").as_posix()
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            skips.add(f"unreadable file ({type(e).__name__})", rid)
            continue
        if not text.strip():
            skips.add("empty report", rid)
            continue
        yield rid, text


def _open_text(path: pathlib.Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _read_jsonl(path: pathlib.Path, skips: SkipCounter) -> Iterator[tuple[str, str]]:
    for n, record in iter_jsonl(path, skips):
        report = record.get("report")
        if not isinstance(report, str) or not report.strip():
            skips.add("missing report", f"{path.name}:{n}")
            continue
        yield str(record.get("id", n)), report


def _read_csv(path: pathlib.Path, skips: SkipCounter) -> Iterator[tuple[str, str]]:
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "report" not in reader.fieldnames:
            raise ValueError(f"{path}: CSV needs a 'report' column, has {reader.fieldnames}")
        first_line = reader.line_num + 1
        for row in reader:
            n, first_line = first_line, reader.line_num + 1  # a record may span lines
            if None in row:
                skips.add("malformed row (extra fields)", f"{path.name}:{n}")
                continue
            report = row.get("report")
            if not report or not report.strip():
                skips.add("missing report", f"{path.name}:{n}")
                continue
            rid = row.get("id")
            yield (rid if rid else str(n)), report


def write_labels_csv(rows: Iterable[tuple[str, Mapping[str, Label]]],
                     out: str | os.PathLike) -> int:
    """Write `id` + the 14 label columns atomically (`io_utils.atomic_write`); returns the rows."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0

    def write(tmp: str) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", *LABELS])
            for rid, labels in rows:
                writer.writerow([rid, *to_row(labels)])
                n += 1

    atomic_write(out, write)
    return n
