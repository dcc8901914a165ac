"""The learning curve of a run: loss and conditioning gap over training steps, both stages, both
directions, read from the stages' metrics.jsonl and drawn as one PNG (`train/curves.py`).

Panels: report -> image and image -> report loss (train `loss/<task>`, held-out
`eval_loss/<task>`), and their conditioning gaps (`gap/<task>/train`, `gap/<task>/heldout`).
Stage 2's steps follow stage 1's on the x axis; a dashed line marks the boundary.
"""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

from llmcxr_jax import tasks
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.train import curves as curves_lib
from llmcxr_jax.train.metrics import METRICS_FILE, read_jsonl

STAGES = (1, 2)
DIRECTIONS = tasks.PAIRED
SERIES = {"loss": (("train", "loss/{d}"), ("held-out", "eval_loss/{d}")),
          "gap": (("train pairs", "gap/{d}/train"), ("held-out pairs", "gap/{d}/heldout"))}
Curve = list[tuple[float, float]]


def read_curves(workdir: str | pathlib.Path) -> tuple[dict[str, list[Curve]], list[float]]:
    """(key -> one [(global step, value)] curve per stage, stage boundaries) from
    WORKDIR/stage{1,2}/metrics.jsonl; a step logged twice keeps its last value."""
    curves: dict[str, list[Curve]] = {}
    offset, boundaries = 0.0, []
    for stage in STAGES:
        path = RunLayout(pathlib.Path(workdir)).stage(stage) / METRICS_FILE
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


def _joined(stage_curves: Sequence[Curve]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The stages' curves as one line, broken (NaN) where a stage ends."""
    steps: list[float] = []
    values: list[float] = []
    for curve in stage_curves:
        if steps:
            steps.append(math.nan)
            values.append(math.nan)
        steps += [x for x, _ in curve]
        values += [y for _, y in curve]
    return tuple(steps), tuple(values)


def panels(curves: dict[str, list[Curve]], boundaries: Sequence[float]) -> list[curves_lib.Panel]:
    """Loss and gap panels, one column per direction; train solid, held-out dashed."""
    out = []
    for kind, title in (("loss", "loss"), ("gap", "conditioning gap")):
        for d in DIRECTIONS:
            series = tuple(
                curves_lib.Series(label, *_joined(curves[key.format(d=d)]), style, f"C{k}")
                for k, ((label, key), style) in enumerate(zip(SERIES[kind], ("-", "--")))
                if curves.get(key.format(d=d)))
            out.append(curves_lib.Panel(f"{tasks.get(d).title}: {title}", series,
                                        ylabel="nats/token",
                                        zero_line=kind == "gap", marks=tuple(boundaries)))
    return out


def plot(workdir: str | pathlib.Path, path: str | pathlib.Path) -> pathlib.Path | None:
    """Draw the learning curve of `workdir` into `path`; None (nothing written) when the
    workdir has no stage metrics."""
    curves, boundaries = read_curves(workdir)
    if not curves:
        return None
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return curves_lib.save_png(curves_lib.figure(panels(curves, boundaries), "learning curve"),
                               path)
