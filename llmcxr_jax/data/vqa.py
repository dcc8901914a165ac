"""CXR-VQA JSONL reader and its join with the image codes.

One JSON object per line: `subject_id`, `study_id`, `question`, `answer` (ids as strings or
integers), optionally `dicom_id` to tie the pair to one image. The original
(hyn2028/llm-cxr `training/mimiccxr_vqa_dataset.py`) reads per-study files with `eval` and joins
them on (subject_id, study_id) with the stage-2 images (PA/AP, earliest study) whose codes are
valid; `join_vqa` does the same join on records from `mimic.load_mimic(..., stage=2)`. JSON only.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Sequence

import numpy as np

from llmcxr_jax.data.jsonl import iter_jsonl
from llmcxr_jax.data.skips import SkipCounter


@dataclasses.dataclass(frozen=True)
class VQARecord:
    subject_id: str
    study_id: str
    question: str
    answer: str
    dicom_id: str = ""  # "" = every selected image of the study


@dataclasses.dataclass(frozen=True)
class VQAExample:
    """A question/answer pair joined with one image's codes."""

    dicom_id: str
    question: str
    answer: str
    codes: np.ndarray  # uint16 [tokens_per_image]


def _id(value) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def read_vqa(path: str | pathlib.Path) -> tuple[list[VQARecord], SkipCounter]:
    """All usable VQA records and what was skipped.

    Skip reasons: `not_json`, `not_object`, `missing_ids` (no usable subject_id / study_id),
    `missing_question`, `missing_answer` (absent, empty, or not a string).
    """
    path = pathlib.Path(path)
    skips = SkipCounter(f"VQA {path.name}")
    out: list[VQARecord] = []
    for line_no, obj in iter_jsonl(path, skips):
        where = f"{path.name}:{line_no}"
        subject, study = _id(obj.get("subject_id")), _id(obj.get("study_id"))
        if subject is None or study is None:
            skips.add("missing_ids", where, str(path))
            continue
        question, answer = obj.get("question"), obj.get("answer")
        if not isinstance(question, str) or not question.strip():
            skips.add("missing_question", where, str(path))
            continue
        if not isinstance(answer, str) or not answer.strip():
            skips.add("missing_answer", where, str(path))
            continue
        out.append(VQARecord(subject, study, question, answer, _id(obj.get("dicom_id")) or ""))
    return out, skips


def join_vqa(vqa: Sequence[VQARecord],
             images_by_study: Mapping[tuple[str, str], Sequence]) -> tuple[list[VQAExample],
                                                                          SkipCounter]:
    """Each VQA record x each usable image of its study (records with `dicom_id`, `codes`).

    `images_by_study` is `MimicData.by_study()` of a stage-2 load (so only frontal images of each
    subject's earliest study with valid codes take part, as in the original). A record whose study
    has no such image is counted as `no_image`.
    """
    skips = SkipCounter("VQA join")
    out: list[VQAExample] = []
    for rec in vqa:
        images = images_by_study.get((rec.subject_id, rec.study_id), ())
        if rec.dicom_id:
            images = [im for im in images if im.dicom_id == rec.dicom_id]
        if not images:
            skips.add("no_image", f"p{rec.subject_id}/s{rec.study_id}")
            continue
        for im in images:
            out.append(VQAExample(im.dicom_id, rec.question, rec.answer, im.codes))
    return out, skips
