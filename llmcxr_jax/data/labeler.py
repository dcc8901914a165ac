"""A CheXpert-style rule labeler for chest radiograph reports.

It follows the three stages of the CheXpert labeler (stanfordmlgroup/chexpert-labeler, built on
NegBio):

1. **Mention extraction**: per observation, CheXpert's own phrase lists (package data,
   `data/chexpert_phrases/`) and this labeler's additions (abbreviations, device types, other
   wordings) are matched in each sentence; "unmention" phrases (CheXpert's and more) remove
   matches that name something else ("pericardial effusion", "calcified nodule", "over the heart").
2. **Mention classification**: each mention is negative, uncertain or positive. CheXpert matches
   patterns on a dependency parse; here the same rules are written over the text with an explicit
   scope (NegEx-style): a *forward* cue ("no", "possible") reaches the mentions after it, a
   *backward* cue ("has resolved", "cannot be excluded") the mentions before it, and a scope ends at
   a clause boundary ("but", "however", ";", "which"), a verb, "with", ", and the", or the next cue.
   Pseudo-cues ("no change in", "not significantly changed") reach mentions but change nothing.
   As in CheXpert, pre-negation uncertainty ("cannot exclude", "no new") is checked first, then
   negation, then uncertainty.
3. **Aggregation** per report: positive beats uncertain beats negative; a special rule makes "No
   Finding" 1 only when no observation but Support Devices (including CheXpert's list of other
   abnormalities: emphysema, scoliosis, granuloma, ...) is positive or uncertain, blank otherwise.

Where this departs from CheXpert's rules, on purpose: "likely" / "probably" hedge (CheXpert's
rules list only "less likely"); an enlargement word beats "stable" for heart and mediastinum
descriptors ("stable enlarged cardiac silhouette" is 1, "heart size is stable" stays -1), and
such a descriptor that nothing describes gives no label ("changes of the mediastinum", "heart
size is XXXX"; CheXpert: 1); "not appreciated" negates; "compatible with" hedges with or without
a verb (CheXpert: with "be" or a modal); "pulmonary vascularity / vasculature" is a hedged Edema
mention (so "normal pulmonary vascularity" is 0); "pleural plaque" is Pleural Other;
"pneumonitis" is Pneumonia; a tracheostomy or defibrillator is a support device and does not rule
out No Finding; pericardial effusion, adenopathy, COPD, a tortuous aorta, spondylosis and low lung
volumes do; wires (sternotomy, pacing), surgical clips, sutures, stents, leads, loop recorders,
filters, shunts and prostheses are support devices (absent from CheXpert's list; real reports
name devices by type); nipple markers, "plate-like", "supportive" and pleural / septal lines are
not devices, nor is a calcified native valve. "The lungs are clear" names no finding (blank), as
in CheXpert, unless `clear_lungs_negative=True` makes it Lung Opacity 0.

Labels are 1.0 (positive), 0.0 (negative), -1.0 (uncertain) and None (not mentioned), as the
CheXpert CSV has them. Reports are sectioned first; by default the labeler reads what MIMIC-CXR's
CheXpert labels were computed on: the IMPRESSION, else the FINDINGS, else the last section (the
whole text when there are no headers, as in generated reports).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Mapping, Optional, Sequence

from llmcxr_jax.data import chexpert_phrases
from llmcxr_jax.data.findings import CHEXPERT_LABELS

LABELS: tuple[str, ...] = CHEXPERT_LABELS
NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
OTHER = "_other"  # abnormalities outside the 14 labels that still rule out "No Finding"

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
Label = Optional[float]

SECTIONS = ("auto", "impression", "findings", "findings+impression", "full")

# --------------------------------------------------------------------------------------------------
# Mention phrases: CheXpert's lists (package data) and this labeler's own (regex fragments),
# matched on lower-cased text from a word start
# --------------------------------------------------------------------------------------------------

_ATTR = "attr"  # heart/mediastinum descriptors: abnormal only when described so; "stable" = -1
_HEDGED = "hedged"  # CheXpert: congestion-type mentions of edema are uncertain unless negated
_NEGATED = "negated"  # "clear lungs": a negative statement about opacity by itself

# CheXpert's phrases that are descriptors or congestion-type mentions (all other phrases: no flag).
_CHEXPERT_FLAGS: dict[str, dict[str, str]] = {
    "Cardiomegaly": {p: _ATTR for p in ("the heart", "heart size", "cardiac size", "cardiac shadow",
                                       "cardiac contour", "cardiac silhouette")},
    "Enlarged Cardiomediastinum": {p: _ATTR for p in (
        "_mediastinum", "cardiomediastinum", "contour", "mediastinal configuration",
        "mediastinal silhouette", "pericardial silhouette", "cardiac silhouette and vascularity")},
    "Edema": {p: _HEDGED for p in ("vascular congestion", "pulmonary congestion", "indistinctness",
                                   "vascular prominence")},
}
# CheXpert's no_finding list names these devices too; here a device never rules out No Finding.
_DEVICES_NOT_OTHER = ("tracheostomy", "defib")
# A phrase also matches after these word-forming prefixes (CheXpert matches anywhere in a word).
_WORD_PREFIX = r"(?:broncho|dextro|levo|kypho|hydro|micro)?"


def _chexpert_regex(phrase: str) -> str:
    """A CheXpert phrase as a regex fragment: "_" is a word boundary, otherwise the phrase matches
    the start of a word and runs to its end ("opaci" -> "opacities"); spaces match any whitespace.
    A leading "the" is context, outside the mention's span, so scopes see "..., and the heart".
    """
    words = phrase.strip("_").split()
    article = words[0] == "the" and len(words) > 1
    body = r"\s+".join(re.escape(word) for word in words[article:])
    head = "(?<=the )" if article else "" if phrase.startswith("_") else _WORD_PREFIX
    return head + body + (r"\b" if phrase.endswith("_") else r"\w*")


def _chexpert_phrases() -> tuple[tuple[str, str, Optional[str]], ...]:
    rows = []
    for obs, phrases in chexpert_phrases.load("mention").items():
        for phrase in phrases:
            if obs == NO_FINDING:
                if phrase not in _DEVICES_NOT_OTHER:
                    rows.append((OTHER, _chexpert_regex(phrase), None))
            else:
                rows.append((obs, _chexpert_regex(phrase),
                             _CHEXPERT_FLAGS.get(obs, {}).get(phrase)))
    return tuple(rows)


# (observation, regex, flag): this labeler's phrases beyond CheXpert's lists (abbreviations,
# device types, other wordings). The flag changes how a mention is classified (see above).
_OWN_PHRASES: tuple[tuple[str, str, Optional[str]], ...] = (
    # Enlarged Cardiomediastinum
    ("Enlarged Cardiomediastinum",
     r"cardiomediastin\w*(?:\s+(?:and\s+hilar\s+)?(?:silhouettes?|contours?|structures|size|width|"
     r"configuration|borders?|shadow))?", _ATTR),
    ("Enlarged Cardiomediastinum",
     r"mediastin(?:um|al)(?:\s+and\s+hilar)?\s+(?:silhouettes?|contours?|configuration|width|"
     r"structures|borders?|shadow|size)", _ATTR),
    ("Enlarged Cardiomediastinum", r"mediastinum", _ATTR),
    ("Enlarged Cardiomediastinum", r"pericardial\s+silhouette", _ATTR),
    ("Enlarged Cardiomediastinum", r"cardiac\s+and\s+mediastinal\s+(?:silhouettes?|contours?)",
     _ATTR),
    ("Enlarged Cardiomediastinum",
     r"(?:widen(?:ed|ing)|enlarge(?:d|ment))\s+(?:of\s+the\s+)?(?:superior\s+)?mediastin\w*", None),
    ("Enlarged Cardiomediastinum", r"mediastinal\s+(?:widening|enlargement)", None),
    # Cardiomegaly
    ("Cardiomegaly", r"cardiomegaly", None),
    ("Cardiomegaly", r"(?:enlarged|large)\s+(?:heart|cardiac\s+silhouette)", None),
    ("Cardiomegaly", r"cardiac\s+enlargement|enlargement\s+of\s+the\s+heart", None),
    ("Cardiomegaly", r"heart\s+size|size\s+of\s+the\s+heart", _ATTR),
    ("Cardiomegaly", r"cardiac\s+(?:size|silhouette|shadow|contours?|diameter)", _ATTR),
    ("Cardiomegaly", r"cardiac\s+and\s+mediastinal\s+(?:silhouettes?|contours?)", _ATTR),
    ("Cardiomegaly", r"cardiac(?=(?:\s*,\s*|\s+and\s+)(?:hilar|mediastinal)\b)", _ATTR),
    ("Cardiomegaly", r"heart(?!\s+(?:failure|border|valve|surgery))\b", _ATTR),
    # Lung Opacity (CheXpert's "airspace opacity" list)
    ("Lung Opacity", r"opaci\w*", None),
    ("Lung Opacity", r"infiltrat\w*", None),
    ("Lung Opacity", r"air[- ]?space\s+(?:disease|process|filling)", None),
    ("Lung Opacity", r"increased\s+(?:density|densities)|decreased\s+translucency", None),
    ("Lung Opacity",
     r"(?:patchy|streaky|linear|focal|confluent|hazy|ill-defined|rounded)\s+densit(?:y|ies)", None),
    ("Lung Opacity",
     r"interstitial\s+(?:markings?|pattern|lung\s+disease|abnormalit\w*|prominence|thickening)",
     None),
    ("Lung Opacity", r"reticular\s+(?:pattern|markings?)|reticulation|reticulonodular", None),
    ("Lung Opacity", r"ground[- ]glass", None),
    ("Lung Opacity", r"(?:parenchymal\s+)?scar(?:s|ring)?\b", None),
    ("Lung Opacity", r"(?:peribronchial|bronchial\s+wall|wall)\s+thickening", None),
    ("Lung Opacity",
     r"lungs?(?:\s+fields?)?(?:\s+(?:are|is|remain|remains|appear|appears))?"
     r"(?:\s+(?:now|otherwise|again|still|well\s+expanded\s+and|grossly|essentially|also))*"
     r"\s+clear\b", _NEGATED),
    ("Lung Opacity", r"clear\s+lungs?", _NEGATED),
    # Lung Lesion
    ("Lung Lesion", r"mass(?:es)?\b", None),
    ("Lung Lesion", r"(?:micro)?nodules?\b", None),
    ("Lung Lesion", r"nodular\s+(?:densit\w*|opacit\w*|lesions?|foc(?:us|i)|areas?)", None),
    ("Lung Lesion",
     r"(?:cavitary|cavitating|pulmonary|lung|parenchymal|spiculated)\s+lesions?", None),
    ("Lung Lesion", r"lumps?\b|carcinoma|neoplasm\w*|tumou?rs?\b|lung\s+cancer", None),
    # Edema
    ("Edema", r"o?edema(?:tous)?\b", None),
    ("Edema", r"(?:congestive\s+)?heart\s+failure|chf\b|fluid\s+overload", None),
    ("Edema",
     r"(?:pulmonary\s+)?(?:vascular|venous)\s+(?:congestion|engorgement|prominence)", _HEDGED),
    ("Edema", r"pulmonary\s+congestion|indistinctness|congestion", _HEDGED),
    ("Edema", r"pulmonary\s+(?:vascularity|vasculature|vascular\s+markings)", _HEDGED),
    # Consolidation / Pneumonia / Atelectasis
    ("Consolidation", r"consolidat\w*", None),
    ("Pneumonia", r"(?:broncho)?pneumonias?\b", None),
    ("Pneumonia", r"infections?\b|infectious(?:\s+process)?|pneumonitis", None),
    ("Atelectasis", r"atelecta\w*", None),
    ("Atelectasis", r"collaps(?:e|ed|es)\b", None),
    # Pneumothorax / Pleural Effusion / Pleural Other
    ("Pneumothorax", r"(?:hydro)?pneumothora(?:x|ces)|ptx\b", None),
    ("Pleural Effusion", r"effusions?\b|pleural\s+fluid|hydro(?:pneumo)?thorax", None),
    ("Pleural Other",
     r"pleural\s+(?:thickening|plaques?)|fibrosis|fibrothorax|pleural\s+scar\w*|"
     r"pleuro-?parenchymal\s+scar\w*|pleural[- ]parenchymal\s+scar\w*|"
     r"pleuro-?pericardial\s+scar\w*", None),
    # Fracture
    ("Fracture", r"fractur\w*", None),
    # Support Devices (CheXpert's list plus the usual abbreviations)
    ("Support Devices",
     r"(?:et|ng|og|ngt|ogt|chest|feeding|enteric|endotracheal|tracheostomy|nasogastric|"
     r"orogastric|dobhoff|gastric|jejunostomy|gastrostomy)\s+tubes?\b", None),
    ("Support Devices", r"tubes?\b|ett\b|endotracheal|tracheostomy|trach\b|dobhoff", None),
    ("Support Devices",
     r"pacers?\b|pacemakers?|pacing\s+(?:wires?|leads?)|leads\b|a?icds?\b|defibrillators?", None),
    ("Support Devices",
     r"lines?\b|picc\b|catheters?\b|swan[- ]ganz|cvc\b|port-?a-?caths?|mediports?|ports?\b", None),
    ("Support Devices", r"drains?\b|cannulas?|stents?\b|coils?\b|plates?\b", None),
    ("Support Devices",
     r"wires?\b|clips?\b|loop\s+recorders?|(?:ivc|vena\s+cava)\s+filters?|shunts?\b", None),
    ("Support Devices", r"screws?\b|hardware|arthroplast\w*|apparatus|devices?\b|equipment", None),
    ("Support Devices", r"sutures?\b|staples?\b|annuloplasty|prosthes[ei]s", None),
    ("Support Devices",
     r"(?:prosthetic|mechanical|bioprosthetic)\s+valves?|valve\s+(?:replacement|prosthesis)|"
     r"support\s+devices?|markers?\b", None),
    # Other abnormalities beyond CheXpert's no_finding list: they only rule out "No Finding".
    (OTHER,
     r"densities|elevated|hyperexpan\w*|bulla\b|osteophyt\w*|metasta\w*|free\s+air|"
     r"bronchiectasis|pericardial\s+effusion|(?:lymph)?adenopathy|"
     r"(?:chronic\s+)?obstructive\s+(?:pulmonary|lung|airways?)\s+disease|"
     r"tortu(?:ous|osity)|ectatic|ectasia|aneurysm\w*|unfolding|spondylo\w*|fibrotic|"
     r"low\s+lung\s+volumes?|hypoinflat\w*|hypoventilat\w*|bronchovascular\s+crowding|"
     r"air\s+trapping|hyperlucen\w*|flatten\w*\s+(?:of\s+the\s+)?(?:hemi)?diaphragms?|"
     r"diaphragmatic\s+flattening|kerley\s+(?:[ab]\s+)?lines?|septal\s+lines?", None),
)
_PHRASES = _OWN_PHRASES + _chexpert_phrases()

# Matches that name something else (CheXpert's unmention lists are added below).
_POSITIONAL = (r"(?:over|overly|overlying|in|into|within|behind|through|along|at|projecting\s+over|"
               r"projects\s+over|projecting\s+in)\s+the\s+(?:(?:superior|upper|lower|left|right|"
               r"anterior|posterior)\s+)?")
_UNMENTIONS: dict[str, str] = {
    "Enlarged Cardiomediastinum": _POSITIONAL + r"mediastinum|shift\s+of\s+the\s+mediastinum|"
                                  r"(?:size|caliber|calibre)\s+and\s+contours?|in\s+contour",
    "Cardiomegaly": _POSITIONAL + r"(?:heart|cardiac\s+(?:silhouette|shadow|contour))|"
                    r"(?:left|right)\s+heart\b",
    "Lung Opacity": r"pleuro-?parenchymal\s+scar\w*|pleural[- ]parenchymal\s+scar\w*|"
                    r"pleuro-?pericardial\s+scar\w*",
    "Lung Lesion": r"calcified\s+granulom\w*",
    "Edema": r"(?:soft[- ]tissue|subcutaneous|chest\s+wall|body\s+wall)\s+edema",
    "Pleural Effusion": r"joint\s+effusions?",
    "Atelectasis": r"vertebral\s+(?:body\s+)?collapse|collapsed?\s+vertebra\w*",
    "Support Devices": r"(?:visceral\s+|parietal\s+)?pleural\s+lines?|septal\s+lines?|"
                       r"kerley\s+(?:[ab]\s+)?lines?|skin\s*(?:fold\s+)?lines?|"
                       r"(?:azygo-?esophageal|paraspinal|paratracheal|junction|fissural)\s+lines?|"
                       r"line\s+of\s+the\s+(?:pleura|fissure)|plate-?\s*like|plateau\w*|"
                       r"plate\s+atelectasis|nipple\s+markers?|tubercul\w*|tuberosit\w*|"
                       r"support(?:s|ed|ive|ing)?\b(?!\s+(?:devices?|lines?|tubes?|apparatus|"
                       r"hardware|equipment))|(?:aortic|mitral|tricuspid|pulmonic)\s+valve\s+"
                       r"(?:calcif\w*|disease|stenosis|regurgitation|sclerosis)|calcifi\w*\s+"
                       r"(?:of\s+the\s+)?(?:aortic|mitral)\s+valve",
}
_UNMENTIONS.update({obs: "|".join([*map(_chexpert_regex, phrases), _UNMENTIONS.get(obs, "(?!)")])
                    for obs, phrases in chexpert_phrases.load("unmention").items()})


@dataclasses.dataclass(frozen=True)
class Mention:
    """One phrase match: which observation, where in the sentence, and its classification."""

    observation: str
    start: int
    end: int
    text: str
    flag: Optional[str]
    label: float = POSITIVE
    cue: str = ""


def _compile_mentions() -> list[tuple[str, re.Pattern, dict[str, Optional[str]]]]:
    """One regex per observation (its phrases in order, one named group each) + group -> flag."""
    out: list[tuple[str, re.Pattern, dict[str, Optional[str]]]] = []
    for obs in dict.fromkeys(obs for obs, _, _ in _PHRASES):
        rows = [(f"g{i}", rx, flag) for i, (o, rx, flag) in enumerate(_PHRASES) if o == obs]
        regex = r"\b(?:" + "|".join(f"(?P<{g}>{rx})" for g, rx, _ in rows) + r")"
        out.append((obs, re.compile(regex), {g: flag for g, _, flag in rows}))
    return out


_MENTION_RES = _compile_mentions()
_UNMENTION_RES = {obs: re.compile(r"\b(?:" + rx + r")") for obs, rx in _UNMENTIONS.items()}

# --------------------------------------------------------------------------------------------------
# Cues
# --------------------------------------------------------------------------------------------------

PRENEG, NEG, UNC, PSEUDO, NEUTRAL = "preneg", "neg", "unc", "pseudo", "neutral"
UNC_ATTR, POS_ATTR = "unc_attr", "pos_attr"
_BLOCKING = (PRENEG, NEG, UNC, PSEUDO)  # kinds that end the scope of cues farther away
_PRECEDENCE = ((PRENEG, UNCERTAIN), (NEG, NEGATIVE), (UNC, UNCERTAIN))  # CheXpert's order

_ADV = (r"(?:now|again|still|also|otherwise|overall|grossly|essentially|completely|entirely|"
        r"fully|totally|definitely|definitively|certainly|clearly|since|subsequently|then|"
        r"previously|in\s+the\s+interval|interval|significantly|reliably|confidently)")
_EXCL = r"(?:be\s+)?(?:" + _ADV + r"\s+)?(?:exclude[sd]?|ruled?\s+out)"
# Words after which an adjective is predicative ("heart size is normal in size") rather than
# attributive ("normal heart size").
_PRED_NEXT = (r"(?:in|for|and|or|with|to|on|at|since|by|from|compared|following|after|size|limits?|"
              r"configuration|caliber|calibre|appearance|contours?|position|bilaterally|again)")


def _attributive(word: str) -> str:
    return r"(?:" + word + r")(?=\s+(?!" + _PRED_NEXT + r"\b)[a-z])"


def _predicative(word: str) -> str:
    return r"(?:" + word + r")(?!\s+(?!" + _PRED_NEXT + r"\b)[a-z])"


_BEFORE_END = (r"(?=\s*(?:$|[,;.]|\b(?:given|in|on|at|as|and|if|clinically|since|though|although|"
               r"but|based|by|from|or)\b))")


@dataclasses.dataclass(frozen=True)
class _CueSpec:
    """A cue pattern: its kind and how many words it reaches forward / backward (None: never)."""

    regex: str
    kind: str
    fwd: Optional[int]
    bwd: Optional[int]


_CUES: tuple[_CueSpec, ...] = (
    # -- pseudo-cues: look like negation, but the finding is there ("no change in the effusion")
    _CueSpec(r"no\s+(?:significant\s+|substantial\s+|appreciable\s+|definite\s+|major\s+|"
             r"other\s+|interval\s+|overall\s+|further\s+|relevant\s+|notable\s+|"
             r"radiographic\s+)*(?:change|increase|decrease|improvement|worsening|progression|"
             r"enlargement|difference|growth|re-?accumulation)(?:\s+(?:in|of|since|from|"
             r"compared))?", PSEUDO, 8, None),
    _CueSpec(r"without\s+(?:significant\s+|substantial\s+|appreciable\s+|interval\s+|"
             r"definite\s+)*(?:change|increase|decrease|improvement|worsening|progression)",
             PSEUDO, 8, 8),
    _CueSpec(r"not\s+(?:been\s+)?(?:significantly\s+|substantially\s+|appreciably\s+|much\s+|"
             r"markedly\s+|substantively\s+)?(?:changed|increased|decreased|improved|worsened)",
             PSEUDO, 8, 8),
    _CueSpec(r"(?:(?:has|have)\s+)?(?:partially|partly|nearly|almost|mostly|largely|"
             r"incompletely|slowly|not\s+(?:completely\s+|fully\s+|entirely\s+)?)resolv(?:ed|ing)",
             PSEUDO, 8, 8),
    _CueSpec(r"resolving|(?:partial|incomplete|near(?:ly)?\s+complete|near[- ]total)\s+"
             r"resolution\s+of", PSEUDO, 8, None),
    _CueSpec(r"not\s+only|no\s+doubt", PSEUDO, 8, None),
    # -- neutral: part of a longer negation ("no focal consolidation to suggest pneumonia")
    _CueSpec(r"to\s+(?:suggest|indicate|represent|explain)|(?:that|which)\s+would\s+"
             r"(?:suggest|indicate|represent|explain)", NEUTRAL, 8, None),
    # -- pre-negation uncertainty: checked before negation ("cannot exclude", "no new")
    _CueSpec(r"(?:cannot|can\s+not|can't|could\s+not|may\s+not)\s+" + _EXCL, PRENEG, 12, 12),
    _CueSpec(r"(?:difficult|hard|impossible)\s+to\s+(?:entirely\s+|completely\s+|"
             r"definitively\s+)?(?:exclude|rule\s+out)", PRENEG, 12, 12),
    _CueSpec(r"not\s+(?:be\s+)?(?:" + _ADV + r"\s+)?(?:excluded|ruled\s+out)", PRENEG, None, 12),
    _CueSpec(r"(?:no|without)\s+new|no\s+evidence\s+to\s+rule\s+out", PRENEG, 8, None),
    # -- negation
    _CueSpec(r"no\s+longer(?:\s+(?:any|a|an))?", NEG, 8, None),
    _CueSpec(r"(?:with\s+)?no|without|nor|neither|absence\s+of|lack\s+of|never|free\s+of|"
             r"negative\s+for|clear\s+of|rather\s+than|instead\s+of|not\s+(?:a|an|any)\b",
             NEG, 12, None),
    _CueSpec(r"(?:(?:clinical|past|prior|remote|known)\s+)?history\s+of|"
             r"(?:interval\s+)?(?:resolution|removal|clearing|disappearance|withdrawal)\s+of|"
             r"(?:to\s+)?(?:rule\s+out|exclude)", NEG, 8, None),
    _CueSpec(_attributive(r"resolved|removed"), NEG, 6, None),
    _CueSpec(_attributive(r"(?:(?:top|upper|high)[- ])?normal|unremarkable"), NEG, 6, None),
    _CueSpec(_predicative(r"(?:(?:top|upper|high)[- ])?normal|unremarkable") +
             r"|within\s+(?:the\s+)?normal\s+limits|"
             r"(?:(?:at|within)\s+)?(?:the\s+)?upper\s+limits?\s+of\s+(?:the\s+)?normal",
             NEG, None, 12),
    _CueSpec(r"(?:(?:is|are|was|were|has\s+been|have\s+been)\s+)?(?:absent|gone)", NEG, None, 12),
    _CueSpec(r"(?:(?:has|have|had)\s+)?(?:(?:since|now|completely|entirely|fully|"
             r"subsequently)\s+)?" + _predicative(r"resolved|cleared|disappeared"), NEG, None, 12),
    _CueSpec(r"(?:(?:has|have|had|was|were|is|are)\s+)?(?:(?:been|since\s+been|now\s+been)\s+)?"
             r"(?:removed|discontinued|taken\s+out)", NEG, None, 12),
    _CueSpec(r"(?:removal|discontinuation)(?!\s+of)", NEG, None, 1),
    _CueSpec(r"no\s+longer\s+(?:\w+\s+)?(?:seen|visualized|visible|present|evident|identified|"
             r"apparent|demonstrated|appreciated|noted|detected|there|in\s+place)", NEG, None, 12),
    _CueSpec(r"not\s+(?:definitely\s+|clearly\s+|convincingly\s+|confidently\s+|readily\s+|"
             r"currently\s+|now\s+|significantly\s+|substantially\s+|markedly\s+)?"
             r"(?:seen|identified|visualized|present|demonstrated|evident|appreciated|noted|"
             r"detected|visible|apparent|enlarged|widened|dilated)",
             NEG, None, 12),
    # -- uncertainty
    _CueSpec(r"(?:(?:is|are|was|were|be|been)\s+)?(?:also\s+)?(?:suspected|questioned|possible|"
             r"probable|(?:(?:less|more|most|very|quite|highly)\s+)?likely|unlikely|"
             r"questionable|equivocal|uncertain|indeterminate|considered|borderline|"
             r"not\s+certain|not\s+clear)" + _BEFORE_END, UNC, None, 12),
    _CueSpec(r"if\s+(?:any|present)|(?:is|are)\s+favou?red", UNC, None, 12),
    _CueSpec(r"borderline(?:\s+(?:enlarged|enlargement|large|widened|prominent|increased))?",
             UNC, 10, 12),
    _CueSpec(r"(?:may|might|could|can|would)\s+(?:also\s+|still\s+)?(?:be|have\s+been)\s+"
             r"(?:present|seen|noted|developing|there|obscured|hidden|contributing)",
             UNC, None, 12),
    _CueSpec(r"(?:not\s+(?:well|clearly|adequately|fully|optimally)|poorly|incompletely|"
             r"suboptimally)\s+(?:seen|visualized|evaluated|assessed|delineated|demonstrated|"
             r"imaged)|(?:(?:is|are|be)\s+)?obscured|(?:difficult|hard)\s+to\s+(?:assess|"
             r"evaluate|see|visualize)|(?:cannot|can\s+not|could\s+not)\s+be\s+(?:accurately\s+|"
             r"reliably\s+|well\s+)?(?:assessed|evaluated)", UNC, None, 12),
    _CueSpec(r"versus|vs|and/or", UNC, 6, 6),
    _CueSpec(r"(?:(?:less|more|most|very|quite|highly)\s+)?(?:likely|probable|probably|possible|"
             r"possibly|presumed|presumably|presumptive|potential|potentially|questionable|"
             r"unlikely|suspected|suspect|suspicious|equivocal|borderline)|question\s+of|"
             r"questioned|suspicion\s+(?:of|for)|concern(?:ing)?\s+(?:for|of)|"
             r"worrisome\s+(?:for|of)|suggest(?:ive|ion)?\s+of|suggest(?:s|ed|ing)?|"
             r"compatible\s+with|"
             r"(?:may|might|could|would|can)\s+(?:also\s+|possibly\s+|potentially\s+)?"
             r"(?:represent|reflect|indicate|include|be|relate|have|signify|suggest|"
             r"account\s+for|correspond|due)|"
             r"differential\s+(?:diagnosis\s+)?(?:includes?|would\s+include|"
             r"considerations?\s+include)|possibility\s+of|raises?\s+(?:the\s+)?(?:question|"
             r"possibility|concern)\s+(?:of|for)|consider|considered|"
             r"correlat\w*\s+(?:clinically\s+)?(?:for|to\s+exclude|with\s+symptoms\s+of)|"
             r"(?:clinical\s+)?correlation\s+for|in\s+question|favou?r(?:s|ed|ing)?",
             UNC, 10, None),
    # -- heart / mediastinum descriptors (only for the "attr" mentions: heart size, silhouette..)
    _CueSpec(r"(?:(?:mildly|moderately|severely|markedly|slightly|minimally|massively)\s+)?"
             r"(?:enlarge(?:d|ment)|large|big|widen(?:ed|ing)|increased|dilat(?:ed|ation)|"
             r"prominent|abnormal)|cardiomegaly", POS_ATTR, 8, 8),
    _CueSpec(r"stable|unchanged|(?:no|without)\s+(?:significant\s+|interval\s+)*change|"
             r"not\s+(?:significantly\s+)?changed|similar|again|constant|persistent(?:ly)?|"
             r"(?:stably|stable\s+in)\s+\w+", UNC_ATTR, 8, 8),
)

_CUE_RES = [(re.compile(r"(?<![\w/-])(?:" + c.regex + r")(?![\w/-])"), c) for c in _CUES]


@dataclasses.dataclass(frozen=True)
class _Cue:
    start: int
    end: int
    spec: _CueSpec
    text: str

    @property
    def kind(self) -> str:
        return self.spec.kind


# Clause boundaries: no scope crosses them.
_CLAUSE_SPLIT = re.compile(
    r"[;:]|\.(?:\s|$)|,\s*otherwise\b|\b(?:but|however|although|though|whereas|while|"
    r"nevertheless|except|"
    r"apart\s+from|aside\s+from|other\s+than|which|who|whose|because|given|"
    r"since\s+(?:the|there))\b")
# Words that end a scope inside a clause: a new predicate or a new noun phrase.
_VERB = (r"is|are|was|were|has|have|had|appears?|appeared|remains?|remained|seems?|looks?|shows?|"
         r"showed|demonstrates?|demonstrated|reveals?|revealed|persists?|persisted|terminates?|"
         r"projects?|measures?|measuring|extends?|courses?|ends?|lies|overlies|obscures?|"
         r"raises?|may|might|could|would|can|cannot|"
         r"should|will")
_SCOPE_STOP = re.compile(
    r"\b(?:" + _VERB + r"|with|there|here|that\s+(?:is|are|has|have))\b|"
    r"(?:,|\band)\s+(?:the|a|an|this|these|its|mild|moderate|severe|small|large|new|stable|"
    r"unchanged|persistent|increased|decreased|there|no)\b")
# The copula / adverb group between a subject and its predicate ("is now", "has been", "is mildly").
_VERB_GROUP = re.compile(
    r"(?:\s*,?\s*\b(?:is|are|was|were|be|been|being|has|have|had|appears?|appeared|remains?|"
    r"remained|seems?|seemed|looks?|now|again|still|also|otherwise|overall|grossly|essentially|"
    r"mildly|moderately|markedly|severely|slightly|minimally|massively|substantially|somewhat|"
    r"significantly|considerably|likely|probably|completely|entirely|fully|since|then|"
    r"subsequently|interval|in\s+the\s+interval|noted\s+to\s+be|felt\s+to\s+be|"
    r"thought\s+to\s+be|to\s+be|not|only|top|upper|all|both|small|tiny|trace|minimal|mild|"
    r"moderate|large|severe|massive)\b)+\s*,?\s*$")
_WORD = re.compile(r"[a-z0-9]+(?:[-/'][a-z0-9]+)*")
_RELAY = re.compile(r"concern|suggest|suspicious|worrisome|to\s")
_STACK_GAP = re.compile(r"^\s*(?:[a-z]+\s*)?$")  # "no suspicious", "without definite evidence of"
_OR_AFTER = re.compile(r"\s*(?:[a-z-]+\s+){0,3}?,?\s*or\b")
_OR_BEFORE = re.compile(r"(?<![\w-])(?P<left>[a-z][a-z-]{2,})\s*,?\s+or\s+(?:[a-z-]+\s+){0,3}$")


def _find_cues(clause: str) -> list[_Cue]:
    """All cue matches of a clause, leftmost-longest, without overlaps."""
    found = [_Cue(m.start(), m.end(), spec, m.group(0))
             for rx, spec in _CUE_RES for m in rx.finditer(clause) if m.end() > m.start()]
    found.sort(key=lambda c: (c.start, -(c.end - c.start)))
    kept: list[_Cue] = []
    for cue in found:
        if not kept or cue.start >= kept[-1].end:
            kept.append(cue)
    return kept


def _forward_reaches(cue: _Cue, gap: str) -> bool:
    """Whether a forward cue reaches a mention across `gap` (the text between them)."""
    return len(_WORD.findall(gap)) <= cue.spec.fwd and not _SCOPE_STOP.search(gap)


def _backward_reaches(cue: _Cue, gap: str) -> bool:
    """Whether a backward cue reaches a mention across `gap` (the predicate's verbs allowed)."""
    gap = _VERB_GROUP.sub("", gap)
    if _SCOPE_STOP.search(gap) or len(_WORD.findall(gap)) > cue.spec.bwd:
        return False
    # "A, B, and C are normal" is a list subject; "A, B normal" is two statements; "A, if
    # present" is one.
    return ("," not in gap or bool(re.search(r"\b(?:and|or)\b", gap))
            or not _WORD.search(gap))


def _cues_for(clause: str, cues: Sequence[_Cue], start: int, end: int) -> list[_Cue]:
    """The cues whose scope covers the span [start, end) of `clause`.

    Walking away from the mention, the nearest cues apply; a negation / uncertainty / pseudo cue
    ends the walk unless the next cue is stacked right against it ("no suspicious nodule").
    """
    def gap(a: int, b: int) -> str:  # text between a and b, neutral cues blanked out
        text = clause[a:b]
        for c in cues:
            if c.kind == NEUTRAL and a <= c.start and c.end <= b:
                text = text[:c.start - a] + " " * (c.end - c.start) + text[c.end - a:]
        return text

    applied: list[_Cue] = []
    before = [c for c in cues if c.end <= start and c.spec.fwd is not None]
    blocked_at: Optional[_Cue] = None
    relay: Optional[_Cue] = None
    for cue in reversed(before):
        if blocked_at is not None and not _STACK_GAP.match(clause[cue.end:blocked_at.start]):
            break
        if relay is not None and "," in clause[cue.end:relay.start]:
            break
        if not _forward_reaches(cue, gap(cue.end, start)):
            break
        applied.append(cue)
        if cue.kind == UNC and blocked_at is None and _RELAY.match(cue.text):
            relay = cue  # "no consolidation concerning for pneumonia": the negation reaches on
        elif cue.kind in _BLOCKING:
            blocked_at = cue
    after = [c for c in cues if c.start >= end and c.spec.bwd is not None]
    blocked_at = None
    for cue in after:
        if blocked_at is not None and not _STACK_GAP.match(clause[blocked_at.end:cue.start]):
            break
        if not _backward_reaches(cue, gap(end, cue.start)):
            break
        applied.append(cue)
        if cue.kind in _BLOCKING:
            blocked_at = cue
    return applied


# One to five whole words. The possessive `++` / `*+` keep a word from being split into pieces:
# with plain `+` / `*` a failed match retried every split of every word, exponential in the
# list's length (a generated "no A B, C D, E F ..." without "or" took minutes).
_NEG_LIST_ITEM = (r"(?:(?!(?:is|are|was|were|has|have|had|with|there|that|seen|identified|noted|"
                  r"present|evident|demonstrated)\b)[a-z0-9/-]++\s*+){1,5}")
_NEGATED_LIST = re.compile(r"\s*" + _NEG_LIST_ITEM + r"(?:,\s*" + _NEG_LIST_ITEM
                           + r")+,?\s*(?:or|nor)\s+" + _NEG_LIST_ITEM)


def _in_negated_list(clause: str, cues: Sequence[_Cue], start: int, end: int) -> Optional[_Cue]:
    """The negation heading a list "no A, B, C, or D" that holds the mention, if any: it reaches
    every item, adjectives and hedges inside the items included ("no focal consolidation,
    suspicious opacity, large effusion, or pneumothorax"), as CheXpert's conj rules do."""
    for cue in cues:
        if cue.kind == NEG and cue.end <= start:
            m = _NEGATED_LIST.match(clause, cue.end)
            if m and m.end() >= end:
                return cue
    return None


def _in_or_coordination(clause: str, start: int, end: int) -> bool:
    """CheXpert: "A or B" makes both uncertain (a negation, checked before, wins)."""
    after = _OR_AFTER.match(clause, end, min(len(clause), end + 40))
    if after and not _SCOPE_STOP.search(after.group(0)):
        return True
    before = _OR_BEFORE.search(clause, max(0, start - 40), start)
    return bool(before) and before.group("left") not in ("with", "more", "less", "one", "two") \
        and not _SCOPE_STOP.search(before.group(0))


def _classify(clause: str, cues: Sequence[_Cue], start: int, end: int,
              flag: Optional[str]) -> tuple[Optional[float], str]:
    """Negative / uncertain / positive for one mention, and the text of the deciding cue; None
    for a heart / mediastinum descriptor that nothing describes (no label)."""
    applied = _cues_for(clause, cues, start, end)
    first: dict[str, str] = {}
    for c in applied:
        first.setdefault(c.kind, c.text)
    heading = _in_negated_list(clause, cues, start, end)
    if heading is not None:
        first.setdefault(NEG, heading.text)
    for kind, label in _PRECEDENCE:
        if kind in first:
            return label, first[kind]
    if flag == _HEDGED:
        return UNCERTAIN, "(congestion)"
    if flag == _ATTR:
        if POS_ATTR in first:
            return POSITIVE, first[POS_ATTR]
        if UNC_ATTR in first:
            return UNCERTAIN, first[UNC_ATTR]
        if PSEUDO in first and "chang" in first[PSEUDO]:  # "no change in heart size"
            return UNCERTAIN, first[PSEUDO]
        return None, ""  # no descriptor: "changes of the mediastinum", "heart size is XXXX"
    if _in_or_coordination(clause, start, end):
        return UNCERTAIN, "or"
    return POSITIVE, ""


# --------------------------------------------------------------------------------------------------
# Text: sections, sentences, clauses
# --------------------------------------------------------------------------------------------------

_SECTION_ALIASES: dict[str, str] = {
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "findings and impression": "impression",
    "findings/impression": "impression", "impression and findings": "impression",
    "findings impression": "impression", "summary": "impression", "opinion": "impression",
    "findings": "findings", "finding": "findings", "report": "findings",
    "indication": "indication", "indications": "indication", "history": "history",
    "clinical history": "history", "reason for exam": "indication",
    "reason for examination": "indication",
    "comparison": "comparison", "comparisons": "comparison", "technique": "technique",
    "examination": "examination", "exam": "examination", "wet read": "wet read",
    "notification": "notification", "recommendation": "recommendation",
    "recommendations": "recommendation", "final report": "preamble",
}
_KNOWN_HEADER = "|".join(sorted((re.escape(k).replace(r"\ ", r"\s+") for k in _SECTION_ALIASES),
                                key=len, reverse=True))
# A known section name (any case) followed by a colon, or an upper-case header at a line start.
_HEADER = re.compile(
    r"(?:(?<=\n)|^)[ \t]*(?P<caps>[A-Z][A-Z &/(),\-]{2,60}?)[ \t]*:(?![^\n]*:\s*$)|"
    r"(?:(?<=\s)|^)(?P<known>(?i:" + _KNOWN_HEADER + r"))[ \t]*:")


def extract_sections(report: str) -> dict[str, str]:
    """Split a report into named sections, in order: {"preamble": ..., "findings": ..., ...}.

    Names are lower-cased and normalised ("IMPRESSIONS", "CONCLUSION" -> "impression"); text before
    the first header is the "preamble"; a repeated section is joined with a newline.
    """
    sections: dict[str, str] = {}
    matches = [m for m in _HEADER.finditer(report)]
    bounds = [(m.start(), m.end(), (m.group("caps") or m.group("known"))) for m in matches]
    pieces = [("preamble", report[:bounds[0][0]] if bounds else report)]
    for i, (_, end, name) in enumerate(bounds):
        stop = bounds[i + 1][0] if i + 1 < len(bounds) else len(report)
        norm = re.sub(r"\s+", " ", name.strip().lower())
        pieces.append((_SECTION_ALIASES.get(norm, norm), report[end:stop]))
    for name, text in pieces:
        text = text.strip()
        if name in sections:
            sections[name] = (sections[name] + "\n" + text).strip()
        elif text or name != "preamble":
            sections[name] = text
    return sections


def select_text(report: str, section: str = "auto") -> str:
    """The part of a report to label.

    `auto` (MIMIC-CXR's CheXpert labels): IMPRESSION, else FINDINGS, else the last section (the
    whole text when the report has no headers at all). `impression` / `findings`: that section only
    ("" when absent). `findings+impression`: both, else like `auto`. `full`: everything.
    """
    if section not in SECTIONS:
        raise ValueError(f"section={section!r}: expected one of {SECTIONS}")
    if section == "full":
        return report
    sections = extract_sections(report)
    if section in ("impression", "findings"):
        return sections.get(section, "")
    if section == "findings+impression":
        both = [sections[k] for k in ("findings", "impression") if sections.get(k)]
        if both:
            return "\n".join(both)
    for key in ("impression", "findings"):
        if sections.get(key):
            return sections[key]
    named = [text for name, text in sections.items() if name != "preamble" and text]
    if named:
        return named[-1]
    return sections.get("preamble", "")


_LIST_ITEM = re.compile(r"(?:^|\n|(?<=[.:;]))\s*\(?\d{1,2}[.)](?!\d)\s+")
_ABBREVIATION = re.compile(r"\b(vs|approx|dr|fig|resp|e\.g|i\.e)\.(?=\s+[a-z0-9(])",
                           re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """Lower-cased, whitespace-normalised sentences; paragraphs and numbered items split too."""
    text = text.replace("\r", "\n")
    text = re.sub(r"_+", " ", text)  # MIMIC's "___" anonymisation
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = _LIST_ITEM.sub("\n. ", paragraph)
        flat = re.sub(r"\s+", " ", paragraph).strip()
        flat = _ABBREVIATION.sub(lambda m: m.group(1).replace(".", ""), flat).lower()
        for piece in re.split(r"(?<=[.!?])\s+|\.$", flat):
            piece = piece.strip(" .")
            if re.search(r"[a-z]", piece):
                sentences.append(piece)
    return sentences


def _clauses(sentence: str) -> list[tuple[int, str]]:
    """(offset, text) pieces of a sentence between clause boundaries (boundary words dropped)."""
    out, pos = [], 0
    for m in _CLAUSE_SPLIT.finditer(sentence):
        out.append((pos, sentence[pos:m.start()]))
        pos = m.end()
    out.append((pos, sentence[pos:]))
    return [(off, text) for off, text in out if text.strip()]


# --------------------------------------------------------------------------------------------------
# Labeling
# --------------------------------------------------------------------------------------------------

def find_mentions(sentence: str, clear_lungs_negative: bool = False) -> list[Mention]:
    """Classified mentions of one lower-cased sentence (see `label_text` for the option)."""
    return list(_sentence_mentions(sentence, clear_lungs_negative))


# Report sets repeat their sentences ("No pneumothorax."): each distinct one is classified once.
@functools.lru_cache(maxsize=1 << 16)
def _sentence_mentions(sentence: str, clear_lungs_negative: bool) -> tuple[Mention, ...]:
    mentions: list[Mention] = []
    for offset, clause in _clauses(sentence):
        spans: dict[str, list[tuple[int, int, Optional[str]]]] = {}
        for obs, rx, flags in _MENTION_RES:
            for m in rx.finditer(clause):
                flag = flags[m.lastgroup]
                if m.end() > m.start() and (flag != _NEGATED or clear_lungs_negative):
                    spans.setdefault(obs, []).append((m.start(), m.end(), flag))
        if not spans:
            continue
        cues = _find_cues(clause)
        for obs, found in spans.items():
            unmention = _UNMENTION_RES.get(obs)
            blocked = [m.span() for m in unmention.finditer(clause)] if unmention else []
            found.sort(key=lambda s: (s[0], -(s[1] - s[0])))
            last_end = -1
            for start, end, flag in found:
                if start < last_end or any(start < b_end and end > b_start
                                           for b_start, b_end in blocked):
                    continue
                last_end = end
                if flag == _NEGATED:
                    label, cue = NEGATIVE, "clear"
                else:
                    own = [c for c in cues if c.end <= start or c.start >= end]
                    label, cue = _classify(clause, own, start, end, flag)
                    if label is None:
                        continue
                mentions.append(Mention(obs, offset + start, offset + end, clause[start:end],
                                        flag, label, cue))
    return tuple(mentions)


def aggregate(mentions: Iterable[Mention], nonempty: bool = True) -> dict[str, Label]:
    """CheXpert aggregation: 1 beats -1 beats 0; No Finding is 1 or blank (None).

    No Finding is 1 when the text is not empty and no mention other than a support device
    (including the other abnormalities outside the 14 labels) is positive or uncertain.
    """
    rank = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}
    out: dict[str, Label] = {name: None for name in LABELS}
    abnormal = False
    for m in mentions:
        if m.observation != SUPPORT_DEVICES and m.label in (POSITIVE, UNCERTAIN):
            abnormal = True
        labels = [(m.observation, m.label)]
        # CheXpert: a positive or uncertain "CHF" / "heart failure" makes Cardiomegaly uncertain.
        if m.observation == "Edema" and m.label != NEGATIVE and re.search(r"chf|heart\s+failure",
                                                                            m.text):
            labels.append(("Cardiomegaly", UNCERTAIN))
        for obs, label in labels:
            if obs == OTHER:
                continue
            if out[obs] is None or rank[label] > rank[out[obs]]:
                out[obs] = label
    out[NO_FINDING] = POSITIVE if nonempty and not abnormal else None
    return out


def label_text(text: str, clear_lungs_negative: bool = False) -> dict[str, Label]:
    """Labels of a piece of report text (no sectioning).

    `clear_lungs_negative`: read "the lungs are clear" as Lung Opacity 0. CheXpert (and so
    MIMIC-CXR's labels and the phantom world) leaves Lung Opacity blank there: it names no finding.
    """
    sentences = split_sentences(text)
    mentions = [m for s in sentences for m in _sentence_mentions(s, clear_lungs_negative)]
    return aggregate(mentions, nonempty=bool(sentences))


def label_report(report: str, section: str = "auto",
                 clear_lungs_negative: bool = False) -> dict[str, Label]:
    """CheXpert labels of one report: {label: 1.0 / 0.0 / -1.0 / None}, in `LABELS` order.

    `section` picks the text (see `select_text`); the default is MIMIC-CXR's choice.
    """
    return label_text(select_text(report, section), clear_lungs_negative)


def label_reports(reports: Iterable[str], section: str = "auto",
                  clear_lungs_negative: bool = False) -> list[dict[str, Label]]:
    """`label_report` over many reports."""
    return [label_report(r, section, clear_lungs_negative) for r in reports]


def explain(report: str, section: str = "auto",
            clear_lungs_negative: bool = False) -> list[tuple[str, Mention]]:
    """(sentence, mention) pairs behind a report's labels: what matched and which cue decided."""
    return [(s, m) for s in split_sentences(select_text(report, section))
            for m in find_mentions(s, clear_lungs_negative)]


def to_row(labels: Mapping[str, Label]) -> list[str]:
    """CSV cells in `LABELS` order: '1.0' / '0.0' / '-1.0' / '' (blank)."""
    return ["" if labels.get(n) is None else f"{float(labels[n]):.1f}" for n in LABELS]
