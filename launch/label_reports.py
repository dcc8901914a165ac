"""Label radiology reports with the CheXpert-style rule labeler.

    python launch/label_reports.py IN --out OUT.csv [--section auto] [--clear-lungs-negative]

IN is a CSV with a `report` column (optional `id`), a JSONL with a `report` field (optional `id`),
or a folder of `.txt` reports (id = path relative to the folder, without `.txt`). OUT.csv gets
`id` plus the 14 CheXpert columns (1.0 / 0.0 / -1.0 / blank), written atomically. Records without
a report and lines that are not JSON are skipped and listed in the printed summary.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from llmcxr_jax.data import labeler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="CSV / JSONL file or folder of .txt reports")
    parser.add_argument("--out", required=True, help="output CSV path")
    parser.add_argument("--section", default="auto", choices=labeler.SECTIONS,
                        help="which part of each report to label (auto: IMPRESSION, else "
                             "FINDINGS, else the last section; as MIMIC-CXR's labels)")
    parser.add_argument("--clear-lungs-negative", action="store_true",
                        help="read 'the lungs are clear' as Lung Opacity 0 (CheXpert: blank)")
    args = parser.parse_args(argv)

    stats = labeler.ReadStats()
    rows = ((rid, labeler.label_report(text, args.section, args.clear_lungs_negative))
            for rid, text in tqdm(labeler.read_reports(args.input, stats), desc="labeling",
                                  unit=" reports", mininterval=2.0))
    try:
        n = labeler.write_labels_csv(rows, args.out)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(stats.summary(args.input))
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
