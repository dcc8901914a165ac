"""Reading JSON Lines safely: JSON only (never `eval`), bad lines skipped and counted."""

from __future__ import annotations

import gzip
import json
import pathlib
from typing import Any, Iterator

from llmcxr_jax.data.skips import SkipCounter


def iter_jsonl(path: str | pathlib.Path, skips: SkipCounter) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object) for each line of a JSONL file (plain or .gz).

    Blank lines are ignored; a line that is not JSON is counted as `not_json` and one that is JSON
    but not an object as `not_object`, both with `file:line`. A missing file raises naming it.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    source = str(path)
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            skips.saw(source)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skips.add("not_json", f"{path.name}:{line_no}", source)
                continue
            if not isinstance(obj, dict):
                skips.add("not_object", f"{path.name}:{line_no}", source)
                continue
            yield line_no, obj
