"""The 14 CheXpert observations and the finding spec shared by the phantom world and the labeler.

Label values follow CheXpert: 1 positive, 0 explicitly negated, -1 uncertain, None (blank in the
CSV) not mentioned. "No Finding" is 1 when no observation other than Support Devices is positive
or uncertain, and blank otherwise (it is never 0), as the CheXpert labeler aggregates.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices")
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(CHEXPERT_LABELS)}

# Labels the phantom world can make positive or uncertain. Pneumonia is a report-level diagnosis
# that only ever accompanies a drawn consolidation; Pleural Other and Fracture only appear negated.
PHANTOM_POSITIVE_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Support Devices")
# Labels with a direct visual correlate in the drawn image (what an image classifier can learn).
PHANTOM_DRAWN_LABELS: tuple[str, ...] = tuple(
    name for name in PHANTOM_POSITIVE_LABELS if name not in ("No Finding", "Pneumonia"))

SIDES = ("left", "right", "bilateral")  # patient's left / right
SEVERITIES = ("mild", "moderate", "severe")  # reports say small/moderate/large for some findings
ZONES = ("upper", "middle", "lower")
DEVICES = ("et_tube", "ng_tube", "central_line", "pacemaker")

# Which attributes each finding carries (the others stay None).
FINDING_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("severity",),
    "Cardiomegaly": ("severity",),
    "Lung Opacity": ("side", "zone", "severity"),
    "Lung Lesion": ("side", "zone", "severity"),  # severity = size: nodule (mild) .. mass (severe)
    "Edema": ("severity",),
    "Consolidation": ("side", "zone", "severity"),
    "Pneumonia": (),
    "Atelectasis": ("side", "severity"),
    "Pneumothorax": ("side", "severity"),
    "Pleural Effusion": ("side", "severity"),
    "Support Devices": ("device",),
}

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
LabelValue = Optional[int]


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding of a study: what is drawn and what the report states.

    `certainty` is 1 (stated as present) or -1 (stated with hedging; drawn subtly). Support devices
    use one `Finding` per device.
    """

    label: str
    certainty: int = POSITIVE
    side: Optional[str] = None
    severity: Optional[str] = None
    zone: Optional[str] = None
    device: Optional[str] = None

    def __post_init__(self) -> None:
        if self.label not in FINDING_ATTRIBUTES:
            raise ValueError(f"finding label {self.label!r} not in {sorted(FINDING_ATTRIBUTES)}")
        if self.certainty not in (POSITIVE, UNCERTAIN):
            raise ValueError(f"{self.label}: certainty {self.certainty} must be 1 or -1")
        allowed = FINDING_ATTRIBUTES[self.label]
        for attr, choices in (("side", SIDES), ("severity", SEVERITIES), ("zone", ZONES),
                              ("device", DEVICES)):
            value = getattr(self, attr)
            if attr in allowed and value not in choices:
                raise ValueError(f"{self.label}: {attr}={value!r} must be one of {choices}")
            if attr not in allowed and value is not None:
                raise ValueError(f"{self.label}: takes no {attr} (got {value!r})")


@dataclasses.dataclass(frozen=True)
class StudyFindings:
    """All findings of a study plus the labels its report explicitly negates."""

    findings: tuple[Finding, ...] = ()
    negated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stated = {f.label for f in self.findings}
        for name in self.negated:
            if name not in LABEL_INDEX or name == "No Finding":
                raise ValueError(f"cannot negate {name!r}")
            if name in stated:
                raise ValueError(f"{name!r} is both a finding and negated")

    def of(self, label: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.label == label)

    def labels(self) -> dict[str, LabelValue]:
        """CheXpert label per observation (1 / 0 / -1 / None)."""
        return labels_from(self.findings, self.negated)


def labels_from(findings: tuple[Finding, ...], negated: tuple[str, ...]) -> dict[str, LabelValue]:
    """CheXpert labels: positive beats uncertain; No Finding is 1 or blank."""
    out: dict[str, LabelValue] = {name: None for name in CHEXPERT_LABELS}
    for name in negated:
        out[name] = NEGATIVE
    for f in findings:
        if out[f.label] != POSITIVE:
            out[f.label] = f.certainty
    abnormal = any(out[name] in (POSITIVE, UNCERTAIN)
                   for name in CHEXPERT_LABELS if name not in ("No Finding", "Support Devices"))
    out["No Finding"] = None if abnormal else POSITIVE
    return out


def labels_to_row(labels: Mapping[str, LabelValue]) -> list[str]:
    """CSV cells in CheXpert order: '1.0' / '0.0' / '-1.0' / '' (blank)."""
    return ["" if labels.get(n) is None else f"{float(labels[n]):.1f}" for n in CHEXPERT_LABELS]


def labels_from_row(cells: list[str]) -> dict[str, LabelValue]:
    """Inverse of `labels_to_row`."""
    if len(cells) != len(CHEXPERT_LABELS):
        raise ValueError(f"expected {len(CHEXPERT_LABELS)} label cells, got {len(cells)}")
    return {n: (None if c.strip() == "" else int(float(c))) for n, c in zip(CHEXPERT_LABELS, cells)}
