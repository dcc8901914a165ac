"""MIMIC-style free-text reports written from a study's findings.

Every positive finding is stated in FINDINGS and again (shorter) in IMPRESSION, every uncertain
one with hedging ("possible", "cannot be excluded"), and every negated label as a pertinent
negative, so a rule labeler recovers `StudyFindings.labels()` exactly. Other CheXpert words never
appear (the INDICATION line names symptoms only).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from llmcxr_jax.data.findings import UNCERTAIN, Finding, StudyFindings

IMPRESSION_ONLY_RATE = 0.05

_INDICATIONS = (
    "___-year-old {sex} with shortness of breath.", "___-year-old {sex} with cough and fever.",
    "___ with chest pain.", "History: ___{sexl} with dyspnea.", "___-year-old {sex} status post fall.",
    "___ with hypoxia.", "Preoperative evaluation.", "___-year-old {sex} with tachycardia.",
    "___ with weakness and fatigue.", "Evaluate for interval change.",
)
_COMPARISONS = ("None.", "___.", "Chest radiograph from ___.", "Prior study from ___.",
                "___ radiograph.", "None available.")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# --- words --------------------------------------------------------------------------------------

_SIZE = {"mild": "small", "moderate": "moderate", "severe": "large"}
_DEGREE = {"mild": "mild", "moderate": "moderate", "severe": "severe"}
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}


def _side_adj(side: str) -> str:
    return {"left": "left", "right": "right", "bilateral": "bilateral"}[side]


def _zone_phrase(rng: np.random.Generator, side: str, zone: str) -> str:
    if side == "bilateral":
        return _pick(rng, {"upper": ("bilateral upper lobes", "bilateral upper lung zones"),
                           "middle": ("bilateral mid lungs", "bilateral mid lung zones"),
                           "lower": ("bilateral lung bases", "bilateral lower lobes")}[zone])
    lobe = {"upper": ("{s} upper lobe", "{s} upper lung zone", "{s} lung apex"),
            "middle": ("{s} mid lung", "{s} mid lung zone",
                       "right middle lobe" if side == "right" else "lingula"),
            "lower": ("{s} lower lobe", "{s} lung base", "{s} lower lung zone")}[zone]
    return _pick(rng, lobe).format(s=side)


# --- positive statements: (findings sentence, impression phrase) ---------------------------------


def _effusion(rng, f: Finding) -> tuple[str, str]:
    size, side = _SIZE[f.severity], f.side
    if side == "bilateral":
        long = _pick(rng, (f"There are {size} bilateral pleural effusions.",
                           f"{size.capitalize()} bilateral pleural effusions are present.",
                           f"Bilateral {size} pleural effusions with blunting of the costophrenic angles.",
                           f"{size.capitalize()} pleural effusions are seen bilaterally.",
                           f"There are {size} pleural effusions on both sides."))
        short = f"{size.capitalize()} bilateral pleural effusions."
    else:
        long = _pick(rng, (f"There is a {size} {side} pleural effusion.",
                           f"A {size} {side} pleural effusion is present.",
                           f"{size.capitalize()} {side} pleural effusion with blunting of the {side} costophrenic angle.",
                           f"{size.capitalize()} {side}-sided pleural effusion.",
                           f"A {size} pleural effusion is seen on the {side}."))
        short = f"{size.capitalize()} {side} pleural effusion."
    return long, short


def _pneumothorax(rng, f: Finding) -> tuple[str, str]:
    size, side = _SIZE[f.severity], f.side
    long = _pick(rng, (f"There is a {size} {side} apical pneumothorax.",
                       f"A {size} {side} pneumothorax is present.",
                       f"{size.capitalize()} {side}-sided pneumothorax with a visible pleural line.",
                       f"A {size} pneumothorax is seen at the {side} apex.",
                       f"There is a {size} pneumothorax on the {side}."))
    return long, f"{size.capitalize()} {side} pneumothorax."


def _cardiomegaly(rng, f: Finding) -> tuple[str, str]:
    d, adv = _DEGREE[f.severity], _ADVERB[f.severity]
    long = _pick(rng, (f"The heart is {adv} enlarged.", f"There is {d} cardiomegaly.",
                       f"Heart size is {adv} enlarged.", f"{d.capitalize()} enlargement of the cardiac silhouette.",
                       f"The cardiac silhouette is {adv} enlarged."))
    return long, f"{d.capitalize()} cardiomegaly."


def _mediastinum(rng, f: Finding) -> tuple[str, str]:
    d, adv = _DEGREE[f.severity], _ADVERB[f.severity]
    long = _pick(rng, (f"The mediastinum is {adv} widened.", f"There is {d} widening of the mediastinum.",
                       f"The cardiomediastinal silhouette is {adv} enlarged.",
                       f"{d.capitalize()} mediastinal widening is noted.",
                       f"The superior mediastinum appears {adv} widened."))
    return long, f"{d.capitalize()} widening of the mediastinum."


def _opacity(rng, f: Finding) -> tuple[str, str]:
    where = _zone_phrase(rng, f.side, f.zone)
    kind = {"mild": "faint", "moderate": "patchy", "severe": "extensive"}[f.severity]
    plural = "opacities" if f.side == "bilateral" else "opacity"
    long = _pick(rng, (f"There is {kind} {plural} in the {where}.", f"{kind.capitalize()} airspace {plural} in the {where}.",
                       f"An ill-defined {kind} {('opacity')} projects over the {where}.",
                       f"{kind.capitalize()} {plural} {'are' if plural == 'opacities' else 'is'} seen in the {where}.",
                       f"New {kind} {plural} in the {where}."))
    return long, f"{kind.capitalize()} {plural} in the {where}."


def _consolidation(rng, f: Finding) -> tuple[str, str]:
    where = _zone_phrase(rng, f.side, f.zone)
    kind = {"mild": "focal", "moderate": "dense", "severe": "extensive"}[f.severity]
    long = _pick(rng, (f"There is {kind} consolidation in the {where}.", f"{kind.capitalize()} consolidation is seen in the {where}.",
                       f"{kind.capitalize()} {where} consolidation.", f"The {where} demonstrates {kind} consolidation.",
                       f"There is {kind} consolidation involving the {where}."))
    return long, f"{kind.capitalize()} {where} consolidation."


def _lesion(rng, f: Finding) -> tuple[str, str]:
    where = _zone_phrase(rng, f.side, f.zone)
    size_cm = {"mild": rng.uniform(0.8, 1.5), "moderate": rng.uniform(1.6, 2.8),
               "severe": rng.uniform(3.5, 5.5)}[f.severity]
    thing = "mass" if f.severity == "severe" else "nodule"
    long = _pick(rng, (f"There is a {size_cm:.1f} cm {thing} in the {where}.",
                       f"A {size_cm:.1f} cm {thing} is seen in the {where}.",
                       f"{thing.capitalize()} in the {where} measures {size_cm:.1f} cm.",
                       f"A rounded {thing} measuring {size_cm:.1f} cm projects over the {where}.",
                       f"New {size_cm:.1f} cm {where} {thing}."))
    return long, f"{size_cm:.1f} cm {where} {thing}."


def _edema(rng, f: Finding) -> tuple[str, str]:
    d = _DEGREE[f.severity]
    long = _pick(rng, (f"There is {d} pulmonary edema.", f"{d.capitalize()} pulmonary edema with perihilar haziness.",
                       f"Findings are consistent with {d} pulmonary edema.",
                       f"{d.capitalize()} interstitial edema with septal lines.",
                       f"Perihilar haziness and septal lines reflect {d} pulmonary edema."))
    return long, f"{d.capitalize()} pulmonary edema."


def _atelectasis(rng, f: Finding) -> tuple[str, str]:
    d = {"mild": "minimal", "moderate": "mild", "severe": "moderate"}[f.severity]
    where = {"left": "left base", "right": "right base", "bilateral": "lung bases"}[f.side]
    long = _pick(rng, (f"There is {d} plate-like atelectasis at the {where}.",
                       f"{d.capitalize()} linear atelectasis at the {where}.",
                       f"{d.capitalize()} atelectasis is seen at the {where}.",
                       f"Band-like {d} atelectasis at the {where}.",
                       f"The {where} {'show' if f.side == 'bilateral' else 'shows'} {d} atelectasis."))
    return long, f"{d.capitalize()} atelectasis at the {where}."


_DEVICE_TEXT = {
    "et_tube": ("Endotracheal tube terminates {n} cm above the carina.",
                "The endotracheal tube tip is {n} cm above the carina.",
                "An endotracheal tube is in standard position, {n} cm above the carina.",
                "ET tube in appropriate position, tip {n} cm from the carina.",
                "Endotracheal tube is present with its tip {n} cm above the carina."),
    "ng_tube": ("A nasogastric tube courses below the diaphragm into the stomach.",
                "Enteric tube tip is in the stomach.",
                "The NG tube terminates in the stomach.",
                "Nasogastric tube passes below the diaphragm with the tip in the stomach.",
                "An orogastric tube is seen with tip in the stomach."),
    "central_line": ("Right internal jugular central venous catheter terminates in the SVC.",
                     "A right-sided central line ends in the lower SVC.",
                     "Right IJ central venous line with tip at the cavoatrial junction.",
                     "The right internal jugular catheter tip projects over the SVC.",
                     "Central venous catheter from the right with tip in the SVC."),
    "pacemaker": ("Left chest wall pacemaker with lead terminating in the right ventricle.",
                  "A left-sided pacemaker is present with its lead in the right ventricle.",
                  "Pacemaker generator over the left chest, lead in the right ventricle.",
                  "Left pectoral pacing device with a single lead in the right ventricle.",
                  "Cardiac pacemaker with lead tip in the right ventricle."),
}
_DEVICE_SHORT = {"et_tube": "endotracheal tube", "ng_tube": "nasogastric tube",
                 "central_line": "right internal jugular line", "pacemaker": "pacemaker"}

_POSITIVE: dict[str, Callable[[np.random.Generator, Finding], tuple[str, str]]] = {
    "Pleural Effusion": _effusion, "Pneumothorax": _pneumothorax, "Cardiomegaly": _cardiomegaly,
    "Enlarged Cardiomediastinum": _mediastinum, "Lung Opacity": _opacity,
    "Consolidation": _consolidation, "Lung Lesion": _lesion, "Edema": _edema,
    "Atelectasis": _atelectasis,
}

# Hedged statements for uncertain findings: "{x}" is a noun phrase.
_HEDGES = ("Possible {x}.", "{X} cannot be excluded.", "Findings may represent {x}.",
           "Questionable {x}.", "Possible {x}, though this may be artifactual.")


def _hedged_noun(rng, f: Finding) -> str:
    side = f.side or ""
    return {
        "Pleural Effusion": (f"small {side} pleural effusion" if side != "bilateral"
                             else "small bilateral pleural effusions"),
        "Pneumothorax": f"small {side} apical pneumothorax",
        "Cardiomegaly": "mild cardiomegaly",
        "Enlarged Cardiomediastinum": "mild widening of the mediastinum",
        "Lung Opacity": f"faint opacity in the {_zone_phrase(rng, side, f.zone or 'lower')}",
        "Consolidation": f"early consolidation in the {_zone_phrase(rng, side, f.zone or 'lower')}",
        "Lung Lesion": f"small nodule in the {_zone_phrase(rng, side, f.zone or 'lower')}",
        "Edema": "mild pulmonary edema",
        "Atelectasis": f"minimal atelectasis at the {'lung bases' if side == 'bilateral' else side + ' base'}",
        "Pneumonia": "pneumonia",
    }[f.label]


def _hedge(rng, f: Finding) -> str:
    noun = _hedged_noun(rng, f)
    text = _pick(rng, _HEDGES)
    return text.replace("{x}", noun).replace("{X}", noun[0].upper() + noun[1:])


# --- negatives ----------------------------------------------------------------------------------

_NEG_SINGLE = {
    "Pleural Effusion": ("No pleural effusion.", "There is no pleural effusion.",
                         "No evidence of pleural effusion."),
    "Pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
    "Consolidation": ("No focal consolidation.", "There is no focal consolidation."),
    "Edema": ("No pulmonary edema.", "There is no pulmonary edema.", "No evidence of pulmonary edema."),
    "Cardiomegaly": ("Heart size is normal.", "The heart is not enlarged.", "No cardiomegaly."),
    "Enlarged Cardiomediastinum": ("Mediastinal contours are normal.",
                                   "The mediastinum is not widened."),
    "Pneumonia": ("No evidence of pneumonia.", "No findings to suggest pneumonia."),
    "Lung Lesion": ("No pulmonary nodules or masses.", "No suspicious pulmonary nodule."),
    "Lung Opacity": ("No focal airspace opacity.", "There is no focal opacity."),
    "Atelectasis": ("No atelectasis.", "There is no atelectasis."),
    "Fracture": ("No displaced rib fractures.", "No acute fracture is seen."),
    "Pleural Other": ("No pleural thickening.",),
}
# Combined negations in one sentence (the labeler must give each noun its own 0).
_NEG_PAIRS = {
    ("Pleural Effusion", "Pneumothorax"): ("No pleural effusion or pneumothorax.",
                                           "There is no pleural effusion or pneumothorax.",
                                           "No evidence of pleural effusion or pneumothorax."),
    ("Consolidation", "Pneumonia"): ("No focal consolidation to suggest pneumonia.",),
    ("Consolidation", "Pleural Effusion"): ("No focal consolidation or pleural effusion.",),
}
_NEG_TRIPLE = ("There is no focal consolidation, pleural effusion, or pneumothorax.",
               "No focal consolidation, pleural effusion or pneumothorax is seen.")


def _negations(rng: np.random.Generator, negated: Sequence[str]) -> list[str]:
    left = list(negated)
    out: list[str] = []
    triple = ("Consolidation", "Pleural Effusion", "Pneumothorax")
    if all(n in left for n in triple) and rng.random() < 0.5:
        out.append(_pick(rng, _NEG_TRIPLE))
        left = [n for n in left if n not in triple]
    for pair, texts in _NEG_PAIRS.items():
        if all(n in left for n in pair) and rng.random() < 0.7:
            out.append(_pick(rng, texts))
            left = [n for n in left if n not in pair]
    out.extend(_pick(rng, _NEG_SINGLE[n]) for n in left)
    return out


_NORMAL_IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
                       "Normal chest radiograph.", "No acute cardiopulmonary abnormality.",
                       "No radiographic evidence of acute cardiopulmonary disease.")
_PARENCHYMAL = ("Lung Opacity", "Consolidation", "Lung Lesion", "Edema", "Atelectasis")


def examination(views: Sequence[str]) -> str:
    frontal = [v for v in views if v in ("PA", "AP")]
    lateral = any(v in ("LATERAL", "LL") for v in views)
    if frontal and frontal[0] == "AP":
        return "CHEST (PORTABLE AP)" if not lateral else "CHEST (AP AND LAT)"
    return "CHEST (PA AND LAT)" if lateral else "CHEST (PA)"


def write_report(sf: StudyFindings, views: Sequence[str], rng: np.random.Generator) -> str:
    """A MIMIC-style report stating exactly the labels of `sf`."""
    sex = _pick(rng, ("man", "woman"))
    indication = _pick(rng, _INDICATIONS).format(sex=sex, sexl=" M" if sex == "man" else " F")
    findings_sents: list[str] = []
    impression_sents: list[str] = []
    devices = [f for f in sf.findings if f.label == "Support Devices"]
    for f in devices:
        findings_sents.append(_pick(rng, _DEVICE_TEXT[f.device]).format(n=int(rng.integers(3, 6))))
    if devices:
        names = [_DEVICE_SHORT[f.device] for f in devices]
        listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        impression_sents.append(f"{listing[0].upper() + listing[1:]} in standard position.")
    abnormal = []
    for f in sf.findings:
        if f.label == "Support Devices":
            continue
        abnormal.append(f)
        if f.certainty == UNCERTAIN:
            text = _hedge(rng, f)
            findings_sents.append(text)
            impression_sents.append(text)
        elif f.label == "Pneumonia":
            impression_sents.append(_pick(rng, ("Findings represent pneumonia.",
                                                "Consistent with pneumonia.",
                                                "Findings are consistent with pneumonia.",
                                                "The consolidation represents pneumonia.",
                                                "Pneumonia.")))
        else:
            long, short = _POSITIVE[f.label](rng, f)
            findings_sents.append(long)
            impression_sents.append(short)
    negs = _negations(rng, sf.negated)
    if not any(f.label in _PARENCHYMAL or f.label in ("Pneumonia",) for f in abnormal) and \
            rng.random() < 0.6:
        negs.insert(0, _pick(rng, ("The lungs are clear.", "Lungs are well expanded and clear.",
                                   "The lungs are clear bilaterally.")))
    if rng.random() < 0.5:
        negs.append(_pick(rng, ("The osseous structures are unremarkable.",
                                "Visualized osseous structures are intact.",
                                "Bony structures are grossly normal.")))
    order = rng.permutation(len(findings_sents)).tolist()
    findings_sents = [findings_sents[i] for i in order] + negs
    if not abnormal:
        impression_sents.append(_pick(rng, _NORMAL_IMPRESSIONS))
    impression_only = rng.random() < IMPRESSION_ONLY_RATE
    if impression_only:  # the impression must then carry the negatives too
        impression_sents = impression_sents + [s for s in _negations(rng, sf.negated)]
    lines = ["                                 FINAL REPORT",
             f" EXAMINATION:  {examination(views)}", "",
             f" INDICATION:  {indication}", "",
             f" COMPARISON:  {_pick(rng, _COMPARISONS)}", ""]
    if not impression_only:
        lines += [" FINDINGS:", "", _wrap(" ".join(findings_sents)), ""]
    lines += [" IMPRESSION:", "", _wrap(" ".join(impression_sents)), ""]
    return "\n".join(lines)


def _wrap(text: str, width: int = 78) -> str:
    """Wrap like MIMIC reports (leading space, ~78 columns)."""
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(" " + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(" " + line)
    return "\n".join(out)
