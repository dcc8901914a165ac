"""databricks-dolly-15k JSONL reader (`instruction`, `context`, `response`, `category`).

As the original (dolly's `load_training_dataset`, which raises on a record with an empty
instruction or response), a record without an instruction or a response is unusable; here it is
skipped and counted instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import pathlib

from llmcxr_jax.data.jsonl import iter_jsonl
from llmcxr_jax.data.skips import SkipCounter


@dataclasses.dataclass(frozen=True)
class DollyRecord:
    instruction: str
    response: str
    context: str = ""  # "" when the record has no input
    category: str = ""


def _text_field(obj: dict, key: str) -> str | None:
    """The stripped-of-nothing string under `key`; None if absent/null; raises TypeError if not str."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(key)
    return value


def read_dolly(path: str | pathlib.Path) -> tuple[list[DollyRecord], SkipCounter]:
    """All usable records of a dolly-format JSONL file, and what was skipped (with line numbers).

    Skip reasons: `not_json`, `not_object`, `missing_instruction`, `missing_response`
    (absent, null, or empty), `bad_field_type` (a field that is not a string).
    """
    path = pathlib.Path(path)
    skips = SkipCounter(f"dolly {path.name}")
    records: list[DollyRecord] = []
    for line_no, obj in iter_jsonl(path, skips):
        where = f"{path.name}:{line_no}"
        try:
            fields = {k: _text_field(obj, k) for k in ("instruction", "response", "context",
                                                      "category")}
        except TypeError as e:
            skips.add("bad_field_type", f"{where} ({e.args[0]})", str(path))
            continue
        if not fields["instruction"]:
            skips.add("missing_instruction", where, str(path))
            continue
        if not fields["response"]:
            skips.add("missing_response", where, str(path))
            continue
        records.append(DollyRecord(fields["instruction"], fields["response"],
                                   fields["context"] or "", fields["category"] or ""))
    return records, skips
