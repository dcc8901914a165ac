"""MIMIC-CXR-JPG reader: report sections as the original parses them, stage-2 selection, and
bad records skipped and counted by reason."""

import numpy as np
import pytest

from llmcxr_jax.data import mimic
from llmcxr_jax.data.skips import SkipCounter
from tiny_mimic_world import (REPORT_FULL, REPORT_FULL_STAGE1, REPORT_FULL_STAGE2,
                              REPORT_IMPRESSION_ONLY, REPORT_IMPRESSION_ONLY_TEXT,
                              REPORT_NO_SECTION, Image, random_codes, write_world)

# ------------------------------------------------------------------------------------------------
# Section parsing
# ------------------------------------------------------------------------------------------------


def test_findings_and_impression_joined_with_anonymisation_kept():
    assert mimic.parse_findings_impression(REPORT_FULL) == REPORT_FULL_STAGE1
    assert mimic.parse_impression(REPORT_FULL) == REPORT_FULL_STAGE2
    assert mimic.parse_findings(REPORT_FULL) == REPORT_FULL_STAGE1[:-len(REPORT_FULL_STAGE2) - 1]


def test_missing_findings_falls_back_to_impression():
    assert mimic.parse_findings_impression(REPORT_IMPRESSION_ONLY) == REPORT_IMPRESSION_ONLY_TEXT
    assert mimic.parse_impression(REPORT_IMPRESSION_ONLY) == REPORT_IMPRESSION_ONLY_TEXT
    assert mimic.parse_findings(REPORT_IMPRESSION_ONLY) is None


def test_neither_section():
    assert mimic.parse_findings_impression(REPORT_NO_SECTION) is None
    assert mimic.parse_impression(REPORT_NO_SECTION) is None
    # Headers are case-sensitive and need their colon, as in the original.
    assert mimic.parse_report("Findings: clear lungs.\nImpression: normal.", 1) is None
    assert mimic.parse_report("FINDINGS\nclear lungs.\nIMPRESSION\nnormal.", 1) is None


def test_findings_without_impression_and_edge_cases():
    text = " FINAL REPORT\n FINDINGS:  Heart size is normal.\n  Lungs are clear.\n\n"
    assert mimic.parse_findings_impression(text) == "Heart size is normal. Lungs are clear."
    assert mimic.parse_impression(text) is None
    # "FINDINGS AND IMPRESSION:" contains "IMPRESSION:" but not "FINDINGS:".
    text = "FINAL REPORT\nFINDINGS AND IMPRESSION:  ___ catheter tip in the SVC.\nNo pneumothorax."
    assert mimic.parse_findings_impression(text) == "___ catheter tip in the SVC. No pneumothorax."
    # IMPRESSION twice after FINDINGS: stage 1 keeps the whole rest, stage 2 has no unique section.
    text = "FINDINGS: A.\nIMPRESSION: B.\nADDENDUM IMPRESSION: C."
    assert mimic.parse_findings_impression(text) == "A. IMPRESSION: B. ADDENDUM IMPRESSION: C."
    assert mimic.parse_impression(text) is None
    # FINDINGS twice: the original falls back to the (unique) impression.
    text = "FINDINGS: A.\nFINDINGS: B.\nIMPRESSION: C."
    assert mimic.parse_findings_impression(text) == "C."
    with pytest.raises(ValueError, match="stage"):
        mimic.parse_report(text, 3)


# ------------------------------------------------------------------------------------------------
# Stage-2 selection
# ------------------------------------------------------------------------------------------------


def _meta(dicom, subject, study, view, date, time):
    return mimic.MetadataRow(dicom, subject, study, view, date, time)


def test_stage2_selection_picks_earliest_frontal_study():
    rows = [
        _meta("a1_pa", "1", "11", "PA", 21800105, 80000.0),
        _meta("a2_lat", "1", "12", "LATERAL", 21800103, 80000.0),  # earliest, but not frontal
        _meta("a3_ap", "1", "13", "AP", 21800104, 80000.0),
        _meta("a3_ll", "1", "13", "LL", 21800104, 80000.0),
        _meta("b1_pa", "2", "21", "PA", 21800101, 130000.0),
        _meta("b2_pa1", "2", "22", "PA", 21800101, 90000.5),  # same day, earlier time
        _meta("b2_pa2", "2", "22", "PA", 21800101, 90000.5),
        _meta("c1", "3", "31", "", 21800101, 0.0),  # no ViewPosition
        _meta("d1_ap", "4", "41", "AP", 21790101, 235959.0),  # date before time
        _meta("d2_pa", "4", "42", "PA", 21790102, 1.0),
    ]
    selected = mimic.select_stage2({r.dicom_id: r for r in rows})
    assert selected == {"a3_ap", "b2_pa1", "b2_pa2", "d1_ap"}


# ------------------------------------------------------------------------------------------------
# The reader on a world with bad records
# ------------------------------------------------------------------------------------------------

S = {"A": "10000001", "B": "10000002", "C": "10000003"}
IMAGES = [
    Image("d01", S["A"], "50000001", date=21800101),
    Image("d02", S["A"], "50000001", view="LATERAL", date=21800101),
    Image("d03", S["A"], "50000002", date=21800201),
    Image("d04", S["B"], "50000003", date=21800301),  # report file missing
    Image("d05", S["B"], "50000004", date=21800201),  # report has neither section
    Image("d06", S["C"], "50000005"),  # codes of the wrong length
    Image("d07", S["C"], "50000005"),  # codes out of range
    Image("d08", S["C"], "50000005"),  # codes missing
    Image("d09", S["A"], "50000001", split="validate"),
]
REPORTS = {(S["A"], "50000001"): REPORT_FULL, (S["A"], "50000002"): REPORT_IMPRESSION_ONLY,
           (S["B"], "50000004"): REPORT_NO_SECTION, (S["C"], "50000005"): REPORT_FULL}
MALFORMED = ["d10,50000006,10000004,train,extra-field", "d11,,10000004,train"]


def _codes():
    codes = random_codes([f"d0{i}" for i in range(1, 10)])
    codes["d06"] = codes["d06"][:255]
    codes["d07"] = codes["d07"].copy()
    codes["d07"][3] = 1024
    del codes["d08"]
    return codes


@pytest.mark.parametrize("gz", [True, False])
def test_stage1_reader_skips_and_counts(tmp_path, gz):
    root = write_world(tmp_path / "w", IMAGES, REPORTS, gz=gz, split_extra_lines=MALFORMED,
                       write_images=False)
    codes = _codes()
    data = mimic.load_mimic(root, codes, stage=1)
    assert [r.dicom_id for r in data.records] == ["d01", "d02", "d03"]
    assert [r.report for r in data.records] == [REPORT_FULL_STAGE1] * 2 + [
        REPORT_IMPRESSION_ONLY_TEXT]
    # The original's parity index: sorted ids of the split after removing malformed codes.
    assert [r.pair_index for r in data.records] == [0, 1, 2]
    np.testing.assert_array_equal(data.records[0].codes, codes["d01"])
    assert data.records[0].codes.dtype == np.uint16
    assert data.skips.as_dict() == {
        "codes_missing": 1, "codes_out_of_range": 1, "codes_wrong_length": 1,
        "malformed_csv_row": 2, "no_section": 1, "report_missing": 1}
    name = "mimic-cxr-2.0.0-split.csv" + (".gz" if gz else "")
    assert data.skips.examples["malformed_csv_row"] == [f"{name}:11", f"{name}:12"]
    assert data.skips.examples["report_missing"][0].endswith("p10/p10000002/s50000003.txt")
    summary = data.skips.summary()
    assert "9 skipped" not in summary and "7 skipped" in summary and "report_missing: 1" in summary

    test = mimic.load_mimic(root, codes, stage=1, splits=("validate", "test"))
    assert [r.dicom_id for r in test.records] == ["d09"]


def test_stage2_reader_uses_selected_subset_and_impression(tmp_path):
    root = write_world(tmp_path / "w", IMAGES, REPORTS, split_extra_lines=MALFORMED,
                       write_images=False)
    data = mimic.load_mimic(root, _codes(), stage=2)
    assert [(r.dicom_id, r.report) for r in data.records] == [("d01", REPORT_FULL_STAGE2)]
    assert data.skips.as_dict() == {
        "codes_missing": 1, "codes_out_of_range": 1, "codes_wrong_length": 1,
        "malformed_csv_row": 2, "no_section": 1, "not_in_stage2_subset": 3}


def test_bad_files_raise_with_their_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv"):
        mimic.load_mimic(tmp_path, {}, stage=1)
    (tmp_path / "mimic-cxr-2.0.0-split.csv").write_text("dicom_id,subject_id,split\nx,1,train\n")
    with pytest.raises(ValueError, match=r"split.csv: missing column\(s\) \['study_id'\]"):
        mimic.load_mimic(tmp_path, {}, stage=1)
    with pytest.raises(ValueError, match="unknown split"):
        mimic.load_mimic(tmp_path, {}, stage=1, splits=("training",))


def test_metadata_bad_date_row_is_counted(tmp_path):
    path = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    path.write_text("dicom_id,subject_id,study_id,ViewPosition,StudyDate,StudyTime\n"
                    "a,1,11,PA,21800101,1.5\n"
                    "b,1,12,,21800101,2\n"
                    "c,1,13,PA,yesterday,2\n")
    skips = SkipCounter()
    rows = mimic.read_metadata(tmp_path, skips)
    assert sorted(rows) == ["a", "b"] and rows["b"].view == ""
    assert skips.as_dict() == {"malformed_csv_row": 1}
    assert skips.examples["malformed_csv_row"] == ["mimic-cxr-2.0.0-metadata.csv:4 (StudyDate/StudyTime)"]
