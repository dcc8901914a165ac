"""What each step of a run was made with, and whether a rerun may reuse it (`STEP.json`).

Every step of `train/run.py` that leaves work in the workdir (world, tokenizer, vqgan, codes,
stage0, stage1, stage2) writes `STEP.json` into its directory before it starts and again when it
is finished: the settings its output depends on, flattened to the `--set` keys
(`train.learning_rate`, `stage1.steps`, ...): its own config sections plus, transitively, those of
the steps it reads (stage 1 records the VQ-GAN's and the world's settings too). A rerun compares
what it asks for now with that record, key by key:

    same settings                         reuse a finished step, resume an unfinished one
    only the step's length, longer        continue from its last checkpoint to the new target
    (`stage1.steps`, `vqgan.steps`, ...)
    anything else                         StepConflict: one line naming each setting (recorded
                                          -> asked) and how to start afresh

Only keys present on both sides are compared: a field added to a config after a step was
recorded does not invalidate it (its default is what the step was made with), and a workdir
written before records existed (no STEP.json) is reused with a note (only its length, where one
is known, is checked). Derived steps (the image codes) are redone instead of refused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Iterable, Mapping

from llmcxr_jax.io_utils import atomic_write_text

RECORD_FILE = "STEP.json"
FORMAT = "llmcxr_jax.step.v1"

# Fields that change how a step is computed, logged or saved, or whether it may start, not what it
# produces. Every other field of a compared config section counts (new fields included).
NOT_RESULT_FIELDS = frozenset({
    "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches",
    "read_threads", "prefetch_buffer", "mesh_data", "remat_policy", "scan_layers",
    "attention_chunk", "total_steps",  # total_steps: derived from the stage's steps
    "max_skip_fraction",  # only decides whether too many bad records stop the run
})


class StepConflict(ValueError):
    """A rerun asks a step for something other than what its directory holds (one line)."""


def flatten(prefix: str, config: Any, only: Iterable[str] | None = None) -> dict[str, Any]:
    """`{prefix.field: value}` of a config dataclass (JSON values: tuples become lists), without
    `NOT_RESULT_FIELDS`; `only` keeps just the named fields."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    keep = set(only) if only is not None else None
    return {f"{prefix}.{k}": json.loads(json.dumps(v)) for k, v in values.items()
            if k not in NOT_RESULT_FIELDS and (keep is None or k in keep)}


def jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), sort_keys=True))


def read(directory: pathlib.Path) -> dict[str, Any] | None:
    path = pathlib.Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StepConflict(f"{path} is not valid JSON ({err}): delete it (the step's settings "
                           f"are then not checked) or the whole {directory}") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise StepConflict(f"{path} is not a step record (no 'settings'): delete it")
    return record


def write(directory: pathlib.Path, step: str, settings: Mapping[str, Any], status: str,
          **extra: Any) -> None:
    """`STEP.json` (atomically): `status` is "started" or "done"."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "step": step, "status": status, "settings": jsonable(settings),
              **extra}
    atomic_write_text(directory / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def differences(recorded: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """Keys present in both whose values differ, sorted."""
    asked = jsonable(asked)
    return sorted(k for k in recorded.keys() & asked.keys() if recorded[k] != asked[k])


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, list, dict)) or v is None else str(v)


def describe(keys: Iterable[str], recorded: Mapping[str, Any], asked: Mapping[str, Any]) -> str:
    """`key=old (this run: new)` for each key."""
    asked = jsonable(asked)
    return ", ".join(f"{k}={_value(recorded[k])} (this run: {_value(asked[k])})" for k in keys)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a run does with one step. `action`: new | reuse | resume | continue | redo | legacy
    (finished before records existed: reused as it is). `done_steps`: the length a finished
    step ran (continue); `record`: its STEP.json (None if absent)."""

    action: str
    record: dict[str, Any] | None = None
    done_steps: int | None = None
    note: str = ""


def decide(label: str, directory: pathlib.Path, asked: Mapping[str, Any], *, finished: bool,
           started: bool = False, length_key: str | None = None, legacy_length: int | None = None,
           derived: bool = False, fresh_hint: str = "") -> Decision:
    """Compare what this run asks of a step with its record (see the module docstring).

    `finished`: its output is complete (marker file); `started`: something of it is there;
    `legacy_length`: for a finished step without a record, the length it ran, when known;
    `derived`: a mismatch means "redo" rather than a conflict."""
    record = read(directory)
    fresh = fresh_hint or f"start afresh with a new --workdir (or delete {directory})"
    if record is None:
        if not (finished or started):
            return Decision("new")
        if not finished:
            return Decision("resume", note=f"{label}: {directory} has no {RECORD_FILE} (started "
                            f"before settings were recorded); resuming it with this run's settings")
        recorded = {length_key: legacy_length} if length_key and legacy_length is not None else {}
        record_like = {"settings": recorded}
        done = legacy_length
        note = (f"note: {label} in {directory} was finished before settings were recorded (no "
                f"{RECORD_FILE}); reusing it without checking them (delete {directory} to "
                f"redo it)")
    else:
        recorded = record["settings"]
        record_like = record
        finished = finished and record.get("status") == "done"
        done = recorded.get(length_key) if length_key else None
        note = ""
    diffs = differences(recorded, asked)
    if derived and diffs:
        return Decision("redo", record,
                        note=f"{label}: made with {describe(diffs, recorded, asked)}; redoing it")
    if not diffs:
        if record is None:
            return Decision("legacy", None, done, note)
        return Decision("reuse" if finished else "resume", record, done)
    if diffs == [length_key]:
        want = jsonable(asked)[length_key]
        if not finished:
            return Decision("resume", record_like if record else None, done, note)
        if isinstance(want, int) and isinstance(done, int) and want > done:
            return Decision("continue", record, done, note)
        raise StepConflict(f"{label} in {directory} already ran {done} steps ({length_key}="
                           f"{done}) and cannot be cut to {want}: ask for {done} or more, or "
                           f"{fresh}")
    what = "was made" if finished else "was started"
    raise StepConflict(f"{label} in {directory} {what} with {describe(diffs, recorded, asked)}: "
                       f"rerun with the recorded values, or {fresh}")
