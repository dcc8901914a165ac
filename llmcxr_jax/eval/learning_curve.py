"""The learning curve of a run: loss and conditioning gap over training steps, both stages, both
directions, read from the stages' metrics.jsonl and drawn as one PNG (PIL; no plotting library).

Panels: report -> image and image -> report loss (train `loss/<task>`, held-out
`eval_loss/<task>`), and their conditioning gaps (`gap/<task>/train`, `gap/<task>/heldout`).
Stage 2's steps follow stage 1's on the x axis; a dashed line marks the boundary.
"""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from llmcxr_jax.train.metrics import read_jsonl

STAGES = (1, 2)
DIRECTIONS = ("report2image", "image2report")
SERIES = {"loss": (("train", "loss/{d}"), ("held-out", "eval_loss/{d}")),
          "gap": (("train pairs", "gap/{d}/train"), ("held-out pairs", "gap/{d}/heldout"))}
COLORS = {0: (31, 119, 180), 1: (255, 127, 14)}
Curve = list[tuple[float, float]]


def read_curves(workdir: str | pathlib.Path) -> tuple[dict[str, list[Curve]], list[float]]:
    """(key -> one [(global step, value)] curve per stage, stage boundaries) from
    WORKDIR/stage{1,2}/metrics.jsonl; a step logged twice keeps its last value."""
    curves: dict[str, list[Curve]] = {}
    offset, boundaries = 0.0, []
    for stage in STAGES:
        path = pathlib.Path(workdir) / f"stage{stage}" / "metrics.jsonl"
        if not path.is_file():
            continue
        records = read_jsonl(path)
        if offset:
            boundaries.append(offset)
        by_key: dict[str, dict[float, float]] = {}
        for r in records:
            for key, value in r.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value) and key != "step":
                    by_key.setdefault(key, {})[offset + r["step"]] = float(value)
        for key, points in by_key.items():
            curves.setdefault(key, []).append(sorted(points.items()))
        offset += max((r["step"] for r in records), default=0)
    return curves, boundaries


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: Sequence[tuple[str, list[Curve]]], boundaries: Sequence[float],
           x_max: float, zero_line: bool, font: ImageFont.ImageFont) -> None:
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 60, top + 20, right - 10, bottom - 35
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    draw.text((x0, top + 4), title, fill=(0, 0, 0), font=font)
    values = [v for _, cs in series for c in cs for _, v in c] + ([0.0] if zero_line else [])
    if not values:
        draw.text((x0 + 10, (y0 + y1) // 2), "not logged", fill=(120, 120, 120), font=font)
        return
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    sx = lambda x: x0 + (x1 - x0) * x / max(x_max, 1.0)  # noqa: E731
    sy = lambda y: y1 - (y1 - y0) * (y - lo) / (hi - lo)  # noqa: E731
    for frac in (0.0, 0.5, 1.0):
        y = lo + frac * (hi - lo)
        draw.text((left + 2, sy(y) - 6), f"{y:.3g}", fill=(0, 0, 0), font=font)
    for x in (0.0, x_max / 2, x_max):
        draw.text((sx(x) - 10, y1 + 4), f"{x:.0f}", fill=(0, 0, 0), font=font)
    draw.text(((x0 + x1) // 2 - 15, y1 + 18), "step", fill=(0, 0, 0), font=font)
    if zero_line and lo < 0 < hi:
        draw.line((x0, sy(0), x1, sy(0)), fill=(160, 160, 160))
    for b in boundaries:
        for y in range(y0, y1, 8):
            draw.line((sx(b), y, sx(b), min(y + 4, y1)), fill=(90, 90, 90))
    for k, (label, stage_curves) in enumerate(series):
        color = COLORS[k]
        for curve in stage_curves:
            points = [(sx(x), sy(y)) for x, y in curve]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for px, py in points if len(points) <= 30 else points[-1:]:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        draw.text((x1 - 200 + 100 * k, top + 4), label, fill=color, font=font)  # legend


def plot(workdir: str | pathlib.Path, path: str | pathlib.Path) -> pathlib.Path | None:
    """Draw the learning curve of `workdir` into `path`; None (nothing written) when the
    workdir has no stage metrics."""
    curves, boundaries = read_curves(workdir)
    if not curves:
        return None
    x_max = max(x for cs in curves.values() for c in cs for x, _ in c)
    width, height = 1000, 640
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    names = {"report2image": "report -> image", "image2report": "image -> report"}
    for col, d in enumerate(DIRECTIONS):
        for row, (kind, unit) in enumerate((("loss", "nats/token"), ("gap", "nats/token"))):
            series = [(label, curves.get(key.format(d=d), [])) for label, key in SERIES[kind]]
            box = (col * width // 2, row * height // 2, (col + 1) * width // 2,
                   (row + 1) * height // 2)
            title = f"{names[d]}: {'loss' if kind == 'loss' else 'conditioning gap'} ({unit})"
            _panel(draw, box, title, series, boundaries, x_max, kind == "gap", font)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
