"""Label radiology reports with the CheXpert-style rule labeler.

    python launch/label_reports.py IN --out OUT.csv [--section findings+impression]
                                   [--clear-lungs-negative]

IN is a CSV with a `report` column (optional `id`), a JSONL with a `report` field (optional `id`),
or a folder of `.txt` reports (id = path relative to the folder, without `.txt`). OUT.csv gets
`id` plus the 14 CheXpert columns (1.0 / 0.0 / -1.0 / blank), written atomically. Records without
a report and lines that are not JSON are skipped and counted in the printed summary.
"""

from tqdm import tqdm

from llmcxr_jax import cli
from llmcxr_jax.data import labeler, report_files
from llmcxr_jax.data.skips import SkipCounter


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("input", help="CSV / JSONL file or folder of .txt reports")
    parser.add_argument("--out", required=True, help="output CSV file")
    parser.add_argument("--section", default="findings+impression", choices=labeler.SECTIONS,
                        help="which part of each report to label (default: FINDINGS and "
                             "IMPRESSION, else as auto; auto: IMPRESSION, else FINDINGS, else the "
                             "last section, as MIMIC-CXR's labels; full: all text)")
    parser.add_argument("--clear-lungs-negative", action="store_true",
                        help="read 'the lungs are clear' as Lung Opacity 0 (CheXpert: blank)")
    cli.add_no_progress(parser)
    args = parser.parse_args(argv)

    skips = SkipCounter(str(args.input))
    rows = ((rid, labeler.label_report(text, args.section, args.clear_lungs_negative))
            for rid, text in tqdm(report_files.read_reports(args.input, skips), desc="labeling",
                                  unit=" reports", mininterval=2.0, disable=args.no_progress))
    try:
        n = report_files.write_labels_csv(rows, args.out)
    except ValueError as e:  # a CSV without a report column
        raise cli.Failure(cli.one_line(e)) from None
    print(skips.summary())
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
