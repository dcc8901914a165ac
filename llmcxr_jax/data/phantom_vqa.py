"""Question/answer pairs about a phantom study, derived from its ground-truth findings.

Question types: `presence` (yes/no with the finding's description), `laterality`, `severity`,
`abnormalities` (a listing) and `devices`. Answers state only what the labels hold, so they are
exactly checkable.
"""

from __future__ import annotations

import numpy as np

from llmcxr_jax.data.findings import UNCERTAIN, Finding, StudyFindings

# Noun used in questions, per label.
_NOUN = {
    "Pleural Effusion": "a pleural effusion", "Pneumothorax": "a pneumothorax",
    "Cardiomegaly": "cardiomegaly", "Enlarged Cardiomediastinum": "a widened mediastinum",
    "Lung Opacity": "a lung opacity", "Consolidation": "consolidation",
    "Lung Lesion": "a lung nodule or mass", "Edema": "pulmonary edema",
    "Atelectasis": "atelectasis", "Support Devices": "a support device",
}
_PRESENCE_TEMPLATES = ("Is there {n}?", "Does the image show {n}?", "Is {n} present?",
                       "Any evidence of {n}?")
_SIZE = {"mild": "small", "moderate": "moderate", "severe": "large"}
_DEGREE = {"mild": "mild", "moderate": "moderate", "severe": "severe"}
_DEVICE = {"et_tube": "an endotracheal tube", "ng_tube": "a nasogastric tube",
           "central_line": "a central venous catheter", "pacemaker": "a pacemaker"}


def describe(f: Finding) -> str:
    """Short noun phrase for a finding, e.g. 'a small left pleural effusion'."""
    side = {"left": "left ", "right": "right ", "bilateral": "bilateral "}.get(f.side or "", "")
    zone = f" in the {f.zone} zone" if f.zone else ""
    sev = f.severity or "mild"
    text = {
        "Pleural Effusion": f"a {_SIZE[sev]} {side}pleural effusion" if f.side != "bilateral"
        else f"{_SIZE[sev]} bilateral pleural effusions",
        "Pneumothorax": f"a {_SIZE[sev]} {side}pneumothorax",
        "Cardiomegaly": f"{_DEGREE[sev]} cardiomegaly",
        "Enlarged Cardiomediastinum": f"{_DEGREE[sev]} widening of the mediastinum",
        "Lung Opacity": f"a {side}lung opacity{zone}",
        "Consolidation": f"{side}consolidation{zone}",
        "Lung Lesion": f"a {side}lung {'mass' if sev == 'severe' else 'nodule'}{zone}",
        "Edema": f"{_DEGREE[sev]} pulmonary edema",
        "Atelectasis": f"{side}basal atelectasis",
        "Pneumonia": "pneumonia",
        "Support Devices": _DEVICE.get(f.device or "", "a support device"),
    }[f.label]
    return ("possibly " + text) if f.certainty == UNCERTAIN else text


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def study_questions(sf: StudyFindings, subject_id: int, study_id: int, dicom_id: str, split: str,
                    rng: np.random.Generator, n_negative: int = 2) -> list[dict]:
    """All questions for one study (about the frontal image `dicom_id`)."""
    base = {"subject_id": subject_id, "study_id": study_id, "dicom_id": dicom_id, "split": split}
    out: list[dict] = []

    def add(question: str, answer: str, label: str, kind: str) -> None:
        out.append({**base, "question": question, "answer": answer, "label": label, "type": kind})

    by_label: dict[str, list[Finding]] = {}
    for f in sf.findings:
        by_label.setdefault(f.label, []).append(f)
    for label, fs in by_label.items():
        if label == "Pneumonia":
            continue
        q = _PRESENCE_TEMPLATES[int(rng.integers(len(_PRESENCE_TEMPLATES)))].format(n=_NOUN[label])
        yes = "Possibly" if all(f.certainty == UNCERTAIN for f in fs) else "Yes"
        add(q, f"{yes}, {_listing([describe(f) for f in fs])}.", label, "presence")
        f = fs[0]
        if f.side is not None and f.certainty != UNCERTAIN:
            where = "both sides" if f.side == "bilateral" else f"the {f.side}"
            add(f"Which side is the {label.lower()} on?",
                f"{_cap(where)}.", label, "laterality")
        if f.severity is not None and f.certainty != UNCERTAIN:
            word = (_SIZE if label in ("Pleural Effusion", "Pneumothorax") else _DEGREE)[f.severity]
            add(f"How severe is the {label.lower()}?", f"{_cap(word)}.", label, "severity")
    absent = [n for n in _NOUN if n not in by_label]
    for label in rng.permutation(absent)[:n_negative]:
        q = _PRESENCE_TEMPLATES[int(rng.integers(len(_PRESENCE_TEMPLATES)))].format(n=_NOUN[label])
        add(q, "No.", str(label), "presence")
    abnormal = [describe(f) for f in sf.findings if f.label not in ("Support Devices",)]
    add("What abnormalities are seen?",
        _cap(_listing(abnormal)) + "." if abnormal else "No acute abnormality.", "", "abnormalities")
    devices = [describe(f) for f in sf.findings if f.label == "Support Devices"]
    add("Are there any lines or tubes?", f"Yes, {_listing(devices)}." if devices else "No.",
        "Support Devices", "devices")
    return out
