"""The human-readable side of `protocol.evaluate`: OUT/report.md with the metric tables and image
grids (PNG files under OUT/images/, referenced from the Markdown).

Two kinds of grid: each report beside the image generated from it (and the VQ-GAN reconstruction
of the real image, for reference), and each image beside the report generated from it.
"""

from __future__ import annotations

import html
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from llmcxr_jax import tasks
from llmcxr_jax.data import images as images_lib

REPORT_FILE = "report.md"
IMAGES_DIR = "images"
MIN_SHOWN_SIDE = 128  # small images are enlarged (nearest neighbour) for viewing


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _enlarge(image: np.ndarray) -> np.ndarray:
    k = max(1, -(-MIN_SHOWN_SIDE // image.shape[0]))
    return images_lib.upscale_nearest(image, k * image.shape[0], k * image.shape[1])


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return html.escape(" ".join(text.split())).replace("|", "&#124;") or "*(empty)*"


def metrics_table(block: Mapping[str, Any], metric_names: Sequence[str],
                  beside: Mapping[str, Mapping[str, Any]] = {}) -> list[str]:
    """Averages (micro / macro / weighted) of each metric, with reference columns beside."""
    head = ["average"] + [m for m in metric_names] + [f"{m} ({name})" for name in beside
                                                      for m in metric_names]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for avg in ("micro", "macro", "weighted"):
        row = [avg] + [_fmt(block[m][avg]) for m in metric_names]
        for ref in beside.values():
            row += [_fmt(ref[m][avg] if isinstance(ref[m], Mapping) else ref[m])
                    for m in metric_names]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def per_finding_table(block: Mapping[str, Any], reference: Mapping[str, Any] | None = None,
                      reference_name: str = "") -> list[str]:
    extra = f" | AUROC ({reference_name}) | F1 ({reference_name})" if reference else ""
    lines = [f"| finding | positives | prevalence | AUROC | F1 | F1 chance{extra} |",
             "|---|---:|---:|---:|---:|---:" + ("|---:|---:" if reference else "") + "|"]
    for name, r in block["per_finding"].items():
        row = (f"| {name} | {r['positives']} | {_fmt(block['chance']['prevalence'][name])} | "
               f"{_fmt(r['auroc'])} | {_fmt(r['f1'])} | "
               f"{_fmt(block['chance']['f1']['per_label'][name])}")
        if reference:
            ref = reference["per_finding"][name]
            row += f" | {_fmt(ref['auroc'])} | {_fmt(ref['f1'])}"
        lines.append(row + " |")
    return lines


def _interval(ci: Any, digits: int = 3) -> str:
    return "n/a" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def intervals_line(block: Mapping[str, Any], names: Mapping[str, str]) -> list[str]:
    """One line: each headline number with its 95 % bootstrap interval over the test items."""
    ci = block.get("ci95") or {}
    parts = [f"{label} {_fmt(_headline(block, key))} {_interval(ci.get(key))}"
             for key, label in names.items()]
    return [f"95 % bootstrap intervals over the test items: {'; '.join(parts)}.", ""]


def _headline(block: Mapping[str, Any], key: str) -> Any:
    """`auroc_macro` -> block["auroc"]["macro"]; `bleu4` -> block["bleu4"]."""
    metric, _, average = key.partition("_")
    return block[metric][average] if average and metric in ("auroc", "f1") else block[key]


def gap_section(result: Mapping[str, Any]) -> list[str]:
    """The conditioning-gap table (both directions, train and test pairs) and the learning
    curve."""
    lines = ["## Conditioning gap", "",
             "Response NLL with another study's input (a derangement of the pairs) minus with "
             "the true input, nats per response token: 0 when the model ignores its input.", "",
             "| direction | pairs | n | NLL true input | NLL mismatched | gap | gap 95 % CI |",
             "|---|---|---:|---:|---:|---:|---|"]
    for direction in tasks.PAIRED:
        for split, g in (result[direction].get("conditioning_gap") or {}).items():
            lines.append(f"| {direction} | {split} | {g['n_pairs']} | {_fmt(g.get('nll_true'))} "
                         f"| {_fmt(g.get('nll_mismatched'))} | {_fmt(g.get('gap'), 4)} | "
                         f"{_interval(g.get('ci95'), 4)} |")
    if result.get("learning_curve"):
        lines += ["", "Loss and conditioning gap over the training steps (stage 2 after the "
                      f"dashed line): ![learning curve]({result['learning_curve']})"]
    if result.get("gap_cells"):
        lines += ["", "Report -> image, test pairs: the gap of each code over the VQ-GAN grid, "
                      "over all pairs and over the pairs with each finding (red: the true report "
                      f"lowers that cell's loss): ![gap by cell]({result['gap_cells']})"]
    return lines + [""]


PROBE_GROUPS = {"single_finding": "exactly one finding", "no_finding": "no finding",
                "any_finding": "any finding"}


def probes_section(result: Mapping[str, Any]) -> list[str]:
    """The single-finding probes (`eval/probes.py`): each direction's macro / micro AUROC and F1,
    with 95 % intervals, on the test items with one, no or any finding."""
    groups = result.get("finding_groups") or {}
    lines = ["## Single-finding probes", "",
             f"The headline metrics again on groups of test items ({groups.get('rule', '')}). "
             "'finding called': the share of the group's items for which the model calls any "
             "finding (other than No Finding) positive; with no finding, the false-alarm rate.",
             "", "| direction | items | n | macro AUROC | micro AUROC | macro F1 | micro F1 | "
                 "finding called |", "|---|---|---:|---|---|---|---|---|"]

    def cell(block: Mapping[str, Any], key: str) -> str:
        if "not_measured" in block and key != "finding_called":
            return "n/a"
        value = _headline(block, key) if key != "finding_called" else block.get(key)
        ci = (block.get("ci95") or {}).get(key) if key != "finding_called" \
            else block.get("finding_called_ci95")
        return f"{_fmt(value)} {_interval(ci)}"

    for direction in tasks.PAIRED:
        for group, label in PROBE_GROUPS.items():
            block = result[direction].get(group)
            if block is None:
                continue
            lines.append(f"| {direction} | {label} | {block['n']} | " + " | ".join(
                cell(block, k) for k in ("auroc_macro", "auroc_micro", "f1_macro", "f1_micro",
                                         "finding_called")) + " |")
    single = result["report2image"].get("single_finding") or {}
    if single.get("n_by_finding"):
        lines += ["", "Single-finding items per finding: " + ", ".join(
            f"{name} {n}" for name, n in single["n_by_finding"].items()) + "."]
    return lines + [""]


def _chance(block: Mapping[str, Any]) -> dict[str, Any]:
    c = block["chance"]
    return {"auroc": {a: c["auroc"] for a in ("micro", "macro", "weighted")}, "f1": c["f1"]}


def _greedy_line(i2r: dict[str, Any]) -> list[str]:
    """The secondary greedy-decoding numbers (the headline samples as the original does)."""
    greedy = i2r.get("greedy")
    if not greedy:
        return []
    ci = (greedy.get("ci95") or {}).get("f1_micro")
    return [f"Greedy decoding of the same images (secondary; the numbers above sample with "
            f"top-p {i2r['decoding']['top_p']:g} as the original does): micro F1 "
            f"{_fmt(greedy['f1']['micro'])} {_interval(ci)}, macro F1 "
            f"{_fmt(greedy['f1']['macro'])}, BLEU-4 {greedy['bleu4']:.4f}, "
            f"ROUGE-L {greedy['rouge_l']:.4f}.", ""]


def write(out: pathlib.Path, result: Mapping[str, Any], *, items: Sequence[tuple[str, str]],
          generated_reports: Sequence[str], generated: np.ndarray, reconstructed: np.ndarray,
          n_show: int = 8) -> pathlib.Path:
    """OUT/report.md and OUT/images/*.png; returns the Markdown path."""
    out = pathlib.Path(out)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    r2i, i2r, lang = result["report2image"], result["image2report"], result["language"]
    n_show = min(n_show, len(items))
    lines = [
        "# LLM-CXR evaluation", "",
        f"Workdir `{result['workdir']}`, model `{result['model']['llm']}` (step "
        f"{result['model']['step']}), seed {result['seed']}; {result['n_test']} test items "
        f"({result['subset']} images of the test split, stage {result['report_stage']} reports).",
        "", "## Report -> image", "",
        f"The CXR classifier (`{r2i['classifier']}`) scores images generated from the test reports "
        f"against the labels of those reports (n = {r2i['n']}). Beside: the VQ-GAN "
        f"reconstructions of the real test images (upper bound) and chance (AUROC 0.5; F1 of "
        f"calling each finding at random with its prevalence).", "",
        f"Scored findings (both classes in the test items): {', '.join(r2i['findings'])}.",
        f"Excluded (a single class): {', '.join(r2i['excluded']) or 'none'}.", "",
    ]
    lines += metrics_table(r2i, ("auroc", "f1"), {"reconstruction": r2i["reconstruction"],
                                                  "chance": _chance(r2i)})
    lines += ["", *intervals_line(r2i, {"auroc_macro": "macro AUROC", "auroc_micro": "micro AUROC",
                                        "f1_macro": "macro F1", "f1_micro": "micro F1"})]
    lines += [*per_finding_table(r2i, r2i["reconstruction"], "reconstruction"), "",
              f"FID (CXR-classifier features) generated vs real test images: {r2i['fid']:.3f}; "
              f"reconstructions vs real: {r2i['fid_reconstruction']:.3f}. "
              f"Inception FID: {r2i['inception_fid']}.", ""]

    lines += ["### Reports and the images generated from them", "",
              "| report | real (VQ-GAN reconstruction) | generated |", "|---|---|---|"]
    for i in range(n_show):
        real_png = f"{IMAGES_DIR}/real_{i}.png"
        gen_png = f"{IMAGES_DIR}/generated_{i}.png"
        images_lib.save_png(out / real_png, _enlarge(reconstructed[i]))
        images_lib.save_png(out / gen_png, _enlarge(generated[i]))
        lines.append(f"| {_cell(items[i][1])} | ![real {i}]({real_png}) | "
                     f"![generated {i}]({gen_png}) |")
    if n_show:
        grid = np.concatenate([np.concatenate([a, b], axis=1)
                               for a, b in zip(reconstructed[:n_show], generated[:n_show])])
        images_lib.save_png(out / IMAGES_DIR / "report2image_grid.png", grid)
        lines += ["", f"All shown pairs in one grid (real | generated per row): "
                      f"![grid]({IMAGES_DIR}/report2image_grid.png)"]
    lines.append("")

    lines += ["## Image -> report", "",
              f"The report labeler (section `{i2r['labeler_section']}`) reads the generated and "
              f"the reference reports (n = {i2r['n']}); uncertain mentions count as positive.", "",
              f"Scored findings: {', '.join(i2r['findings'])}. "
              f"Excluded (a single class in the references): "
              f"{', '.join(i2r['excluded']) or 'none'}.",
              ""]
    lines += metrics_table(i2r, ("auroc", "f1", "jaccard"), {"chance": {
        **_chance(i2r), "jaccard": {a: None for a in ("micro", "macro", "weighted")}}})
    lines += ["", *intervals_line(i2r, {"f1_micro": "micro F1", "f1_macro": "macro F1",
                                        "auroc_macro": "macro AUROC",
                                        "auroc_micro": "micro AUROC", "bleu4": "BLEU-4",
                                        "rouge_l": "ROUGE-L"})]
    lines += [*per_finding_table(i2r), "",
              f"BLEU-1 {i2r['bleu1']:.4f}, BLEU-4 {i2r['bleu4']:.4f}, ROUGE-L {i2r['rouge_l']:.4f} "
              f"(sacrebleu / rouge-score, n = {i2r['n']}).", "",
              *_greedy_line(i2r),
              "### Images and the reports generated from them", "",
              "| image (VQ-GAN reconstruction) | reference report | generated report |",
              "|---|---|---|"]
    for i in range(n_show):
        lines.append(f"| ![image {i}]({IMAGES_DIR}/real_{i}.png) | {_cell(items[i][1])} | "
                     f"{_cell(generated_reports[i])} |")

    lines += ["", *probes_section(result), *gap_section(result)]
    lines += ["## Language retention", "",
              f"{lang['n']} held-out procedural instructions (seed {lang['heldout_seed']}, "
              f"deduplicated against the training instructions). Perplexity of the reference "
              f"response; exact-match accuracy of a greedy answer.", "",
              "| model | source | perplexity | exact match | n |", "|---|---|---:|---:|---:|"]
    for name in ("base", "finetuned"):
        r = lang[name]
        lines.append(f"| {name} | `{r['source']}` | {r['perplexity']:.2f} | {r['accuracy']:.3f} "
                     f"({r['correct']}/{r['n']}) | {r['n']} |")
    lines.append("")
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
