"""The phantom world on disk: MIMIC-CXR-JPG layout, CSV columns, reports vs labels, determinism."""

import csv
import dataclasses
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llmcxr_jax.data.findings import CHEXPERT_LABELS, UNCERTAIN, labels_from_row
from llmcxr_jax.data.phantom_reports import write_report
from llmcxr_jax.data.phantom_world import WorldConfig, write_world
from llmcxr_jax.data.phantoms import sample_findings

CFG = WorldConfig(n_studies=14, size=64, seed=3, n_instructions=40)
# Words a reader looks for, written independently of the report templates.
KEYWORDS = {
    "Enlarged Cardiomediastinum": r"mediastin", "Cardiomegaly": r"cardiomegaly|heart|cardiac",
    "Lung Opacity": r"opacit", "Lung Lesion": r"nodule|mass", "Edema": r"edema",
    "Consolidation": r"consolidation", "Pneumonia": r"pneumonia", "Atelectasis": r"atelectasis",
    "Pneumothorax": r"pneumothorax", "Pleural Effusion": r"effusion",
    "Support Devices": r"tube|catheter|line|pacemaker", "Fracture": r"fracture",
    "Pleural Other": r"pleural thickening"}
HEDGE = r"possible|cannot be excluded|may represent|questionable"


def _csv(path: pathlib.Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return list(csv.DictReader(f))


def _sections(report: str) -> dict[str, str]:
    parts = re.split(r"^ ([A-Z ]+):", report, flags=re.M)
    return {parts[i].strip(): " ".join(parts[i + 1].split()) for i in range(1, len(parts) - 1, 2)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("w") / "phantoms"
    summary = write_world(out, CFG, workers=1, progress=False)
    assert summary["images"] >= CFG.n_studies
    return out


def test_layout_and_csv_columns(world):
    split = _csv(world / "mimic-cxr-2.0.0-split.csv.gz")
    meta = _csv(world / "mimic-cxr-2.0.0-metadata.csv.gz")
    chex = _csv(world / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert list(meta[0]) == [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
        "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
    assert list(chex[0]) == ["subject_id", "study_id"] + list(CHEXPERT_LABELS)
    assert len(split) == len(meta) and len(chex) == CFG.n_studies
    jpgs = sorted(world.glob("files/p*/p*/s*/*.jpg"))
    assert len(jpgs) == len(meta)
    for row in meta:
        subject = row["subject_id"]
        assert re.fullmatch(r"1\d{7}", subject) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", row["dicom_id"])
        jpg = world / f"files/p{subject[:2]}/p{subject}/s{row['study_id']}/{row['dicom_id']}.jpg"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (64, 64)
        assert (world / f"reports/files/p{subject[:2]}/p{subject}/s{row['study_id']}.txt").exists()
        assert row["ViewPosition"] in ("PA", "AP", "LATERAL", "LL")
        assert re.fullmatch(r"2\d{7}", row["StudyDate"]) and float(row["StudyTime"]) < 240000
    # Every study has a frontal view; several studies per subject; split by subject.
    frontal = {r["study_id"] for r in meta if r["ViewPosition"] in ("PA", "AP")}
    assert frontal == {r["study_id"] for r in chex}
    studies_per_subject = {}
    for r in chex:
        studies_per_subject.setdefault(r["subject_id"], set()).add(r["study_id"])
    assert max(len(s) for s in studies_per_subject.values()) >= 2
    split_of = {}
    for r in split:
        assert split_of.setdefault(r["subject_id"], r["split"]) == r["split"]
    assert set(split_of.values()) <= {"train", "validate", "test"}
    assert not list(world.parent.glob("*.tmp-*"))  # nothing half-written left behind


def test_reports_state_exactly_the_labels(world):
    chex = _csv(world / "mimic-cxr-2.0.0-chexpert.csv.gz")
    gt = {json.loads(l)["study_id"]: json.loads(l) for l in open(world / "phantom_labels.jsonl")}
    for row in chex:
        labels = labels_from_row([row[n] for n in CHEXPERT_LABELS])
        assert labels == gt[int(row["study_id"])]["labels"]
        s = row["subject_id"]
        report = (world / f"reports/files/p{s[:2]}/p{s}/s{row['study_id']}.txt").read_text()
        _check_report(report, labels)


def _check_report(report: str, labels: dict) -> None:
    assert report.lstrip().startswith("FINAL REPORT")
    for head in ("EXAMINATION:", "INDICATION:", "COMPARISON:", "IMPRESSION:"):
        assert head in report
    sec = _sections(report)
    body = (sec.get("FINDINGS", "") + " " + sec["IMPRESSION"]).lower()
    impression = sec["IMPRESSION"].lower()
    for name, pattern in KEYWORDS.items():
        value = labels[name]
        if value in (1, -1):
            assert re.search(pattern, impression), (name, report)
        if value == -1:
            assert re.search(HEDGE, body), (name, report)
        if value == 0:
            assert re.search(pattern, body), (name, report)
            assert re.search(r"\bno\b|\bnot\b|normal", body)
        if value is None and name not in ("Cardiomegaly", "Support Devices"):
            assert not re.search(pattern, body), (name, report)
    indication = sec["INDICATION"].lower()
    assert not any(re.search(p, indication) for p in KEYWORDS.values())


def test_report_variety_and_impression_only_fraction():
    rng = np.random.default_rng(0)
    sentences = {name: set() for name in KEYWORDS}
    impression_only = 0
    n = 1500
    for _ in range(n):
        sf = sample_findings(rng)
        report = write_report(sf, ["PA"], rng)
        labels = sf.labels()
        _check_report(report, labels)
        impression_only += "FINDINGS:" not in report
        for sent in re.split(r"(?<=\.)\s+", " ".join(_sections(report).get("FINDINGS", "").split())):
            for name, pattern in KEYWORDS.items():
                if labels[name] == 1 and re.search(pattern, sent.lower()):
                    sentences[name].add(re.sub(r"\b(left|right|bilateral|small|moderate|large|"
                                               r"mild|severe|\d+(\.\d)?)\b", "#", sent))
    assert 0.02 < impression_only / n < 0.09
    for name in ("Pleural Effusion", "Pneumothorax", "Cardiomegaly", "Enlarged Cardiomediastinum",
                 "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Atelectasis",
                 "Support Devices"):
        assert len(sentences[name]) >= 5, (name, sentences[name])


def test_vqa_and_instructions_files(world):
    gt = {json.loads(l)["study_id"]: json.loads(l) for l in open(world / "phantom_labels.jsonl")}
    vqa = [json.loads(l) for l in open(world / "vqa.jsonl")]
    assert {"subject_id", "study_id", "dicom_id", "question", "answer", "label", "type"} <= set(vqa[0])
    for q in vqa:
        labels = gt[q["study_id"]]["labels"]
        if q["type"] == "presence":
            assert q["answer"].startswith("No") == (labels[q["label"]] in (None, 0)), q
            if labels[q["label"]] == UNCERTAIN:
                assert q["answer"].startswith("Possibly")
        if q["type"] == "laterality":
            side = next(f["side"] for f in gt[q["study_id"]]["findings"] if f["label"] == q["label"])
            assert (side if side != "bilateral" else "both") in q["answer"].lower()
    assert {q["type"] for q in vqa} >= {"presence", "abnormalities", "devices"}
    instr = [json.loads(l) for l in open(world / "instructions.jsonl")]
    assert len(instr) == CFG.n_instructions
    assert all(set(r) >= {"instruction", "context", "response", "category"} for r in instr)


def _write_world_in_a_process(out: pathlib.Path, hash_seed: int) -> None:
    """The same world written by another Python process, whose str hashes (and so the order of
    any set of strings) follow PYTHONHASHSEED."""
    code = ("import sys; from llmcxr_jax.data.phantom_world import WorldConfig, write_world; "
            f"write_world(sys.argv[1], WorldConfig(**{dataclasses.asdict(CFG)!r}), workers=1, "
            "progress=False)")
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=300)


def test_same_seed_byte_identical_and_atomic(world, tmp_path):
    """Byte-identical in this process and in two others with other string hashes (a set's order
    once picked the letter of the instructions' count_letter task)."""
    for name, hash_seed in (("again", None), ("hash1", 1), ("hash2", 2)):
        again = tmp_path / name
        if hash_seed is None:
            write_world(again, CFG, workers=1, progress=False)
        else:
            _write_world_in_a_process(again, hash_seed)
        files_a = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
        assert files_a == files_b
        for rel in files_a:
            assert (world / rel).read_bytes() == (again / rel).read_bytes(), (name, rel)
    again = tmp_path / "again"
    with pytest.raises(FileExistsError, match="overwrite"):
        write_world(again, CFG, workers=1, progress=False)
    other = tmp_path / "other"
    write_world(other, WorldConfig(n_studies=3, size=64, seed=4, n_instructions=5), workers=1,
                progress=False)
    assert (other / "mimic-cxr-2.0.0-split.csv.gz").read_bytes() != (
        world / "mimic-cxr-2.0.0-split.csv.gz").read_bytes()
