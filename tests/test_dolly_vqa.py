"""Dolly-15k and VQA JSONL readers: good records kept, bad lines skipped and counted by line."""

import json

import numpy as np
import pytest

from llmcxr_jax.data import dolly, mimic, vqa


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dolly_reader(tmp_path):
    path = _write_lines(tmp_path / "databricks-dolly-15k.jsonl", [
        json.dumps({"instruction": "When did Virgin Australia start operating?",
                    "context": "Virgin Australia ... commenced services on 31 August 2000.",
                    "response": "31 August 2000.", "category": "closed_qa"}),
        json.dumps({"instruction": "Which is a species of fish? Tope or Rope",
                    "context": "", "response": "Tope", "category": "classification"}),
        json.dumps({"instruction": "", "context": "", "response": "x", "category": "open_qa"}),
        json.dumps({"instruction": "Say hi", "context": ""}),  # response absent
        json.dumps({"instruction": "Say hi", "response": None}),
        "{'instruction': 'python dict, not JSON'}",
        "",  # blank lines are ignored
        json.dumps(["a", "list"]),
        json.dumps({"instruction": "Count", "response": 3}),
        json.dumps({"instruction": "List three colours", "response": "red, green, blue"}),
    ])
    records, skips = dolly.read_dolly(path)
    assert [r.instruction for r in records] == [
        "When did Virgin Australia start operating?", "Which is a species of fish? Tope or Rope",
        "List three colours"]
    assert records[0].context.startswith("Virgin Australia") and records[1].context == ""
    assert records[2].category == "" and records[0].category == "closed_qa"
    assert skips.as_dict() == {"bad_field_type": 1, "missing_instruction": 1,
                               "missing_response": 2, "not_json": 1, "not_object": 1}
    name = path.name
    assert skips.examples["not_json"] == [f"{name}:6"]
    assert skips.examples["not_object"] == [f"{name}:8"]
    assert skips.examples["missing_response"] == [f"{name}:4", f"{name}:5"]
    assert skips.examples["bad_field_type"] == [f"{name}:9 (response)"]


def test_dolly_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        dolly.read_dolly(tmp_path / "nope.jsonl")


def test_vqa_reader_and_join(tmp_path):
    path = _write_lines(tmp_path / "vqa.jsonl", [
        json.dumps({"subject_id": 10000001, "study_id": "50000001",
                    "question": "Is there a pleural effusion?", "answer": "No."}),
        json.dumps({"subject_id": "10000001", "study_id": 50000001, "dicom_id": "d02",
                    "question": "Is the heart enlarged?", "answer": "Yes, mildly."}),
        json.dumps({"subject_id": "10000009", "study_id": "50000009",
                    "question": "Any pneumothorax?", "answer": "No."}),  # no such image
        json.dumps({"study_id": "1", "question": "q", "answer": "a"}),
        json.dumps({"subject_id": "1", "study_id": "1", "question": "", "answer": "a"}),
        json.dumps({"subject_id": "1", "study_id": "1", "question": "q"}),
        "not json at all",
    ])
    records, skips = vqa.read_vqa(path)
    assert len(records) == 3
    assert records[0] == vqa.VQARecord("10000001", "50000001", "Is there a pleural effusion?", "No.")
    assert skips.as_dict() == {"missing_answer": 1, "missing_ids": 1, "missing_question": 1,
                               "not_json": 1}
    assert skips.examples["not_json"] == ["vqa.jsonl:7"]

    codes = [np.full(4, i, np.uint16) for i in range(3)]
    images = [mimic.MimicRecord(f"d0{i + 1}", "10000001", "50000001", "train", "r", codes[i], i)
              for i in range(3)]
    joined, join_skips = vqa.join_vqa(records, {("10000001", "50000001"): images})
    # The study-level question goes with every image of the study; the dicom-level one with d02.
    assert [(e.dicom_id, e.question) for e in joined] == [
        ("d01", "Is there a pleural effusion?"), ("d02", "Is there a pleural effusion?"),
        ("d03", "Is there a pleural effusion?"), ("d02", "Is the heart enlarged?")]
    np.testing.assert_array_equal(joined[3].codes, codes[1])
    assert join_skips.as_dict() == {"no_image": 1}
