"""Training curves as PNG pictures, drawn from the `metrics.jsonl` a run already writes.

- An LLM stage (`write_stage_curves` -> STAGE_DIR/curves.png): loss over all tasks and per task
  with the held-out loss, the learning rate, tokens/s, and the conditioning gaps
  `gap/<direction>/<train|heldout>` where they were measured.
- A VQ-GAN run (`write_vqgan_curves` -> WORKDIR/curves.png): reconstruction losses, codebook
  loss, the adversarial losses once the discriminator is on, code perplexity, images/s.
- `figure` draws any list of `Panel`s; the evaluation's learning curve over both stages
  (`eval/learning_curve.py`) uses it too.

matplotlib's object API on its Agg canvas: no pyplot, so no global figure state and no display.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure

from llmcxr_jax.io_utils import atomic_write
from llmcxr_jax.train.metrics import METRICS_FILE, read_jsonl

CURVES_FILE = "curves.png"
DPI = 100
PANEL_SIZE = (6.0, 3.6)  # inches: 600 x 360 px per panel at DPI
MARKED_POINTS = 30  # a series with at most this many points marks each of them


@dataclasses.dataclass(frozen=True)
class Series:
    """One line: values over steps (NaN breaks the line, e.g. between two stages); `color` None
    takes the next of matplotlib's cycle."""

    label: str
    steps: tuple[float, ...]
    values: tuple[float, ...]
    linestyle: str = "-"
    color: str | None = None


@dataclasses.dataclass(frozen=True)
class Panel:
    """One set of axes (no series: drawn empty, "not logged"). `marks`: steps drawn as dashed
    vertical lines (stage boundaries)."""

    title: str
    series: tuple[Series, ...]
    ylabel: str = ""
    log_y: bool = False
    zero_line: bool = False
    marks: tuple[float, ...] = ()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(records: Iterable[Mapping[str, Any]], key: str, label: str | None = None,
           linestyle: str = "-", color: str | None = None) -> Series | None:
    """`key`'s finite values by step, in step order; None when it has none. A step logged twice
    keeps its last value (a resumed run logs again the steps after its last checkpoint)."""
    points: dict[float, float] = {}
    for record in records:
        value = _number(record.get(key))
        if value is not None and "step" in record:
            points[float(record["step"])] = value
    if not points:
        return None
    steps = tuple(sorted(points))
    return Series(label or key, steps, tuple(points[s] for s in steps), linestyle, color)


def _panel(title: str, items: Sequence[Series | None], **kwargs: Any) -> Panel | None:
    kept = tuple(s for s in items if s is not None)
    return Panel(title, kept, **kwargs) if kept else None


def _suffixes(records: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    """The `<name>` of every `<prefix><name>` key, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if key.startswith(prefix):
                seen.setdefault(key[len(prefix):], None)
    return list(seen)


def stage_panels(records: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """An LLM stage's panels from its metrics records (`train/metrics.py`'s TrainLogger keys)."""
    loss = [series(records, "loss", "all tasks")]
    loss += [series(records, f"loss/{task}", task) for task in _suffixes(records, "loss/")]
    loss += [series(records, "eval_loss", "held-out, all tasks", "--")]
    directions = list(dict.fromkeys(name.split("/")[0] for name in _suffixes(records, "gap/")))
    gaps = [series(records, f"gap/{d}/{split}", f"{d.replace('2', ' -> ')}, {pairs}", style,
                   f"C{i}")
            for i, d in enumerate(directions)
            for split, pairs, style in (("train", "train pairs", "-"),
                                        ("heldout", "held-out pairs", "--"))]
    panels = [
        _panel("loss", loss, ylabel="nats per response token"),
        _panel("learning rate", [series(records, "learning_rate", "learning rate")]),
        _panel("throughput", [series(records, "tokens_per_s", "tokens/s")],
               ylabel="tokens/s (all positions)"),
        _panel("conditioning gap (loss without - with the input)", gaps,
               ylabel="nats per response token", zero_line=True),
    ]
    return [p for p in panels if p is not None]


def vqgan_panels(records: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """A VQ-GAN run's panels from its metrics records (`vqgan/train.py`'s step metrics)."""
    gan_on = any((_number(r.get("disc_factor")) or 0.0) > 0 for r in records)
    panels = [
        _panel("reconstruction", [series(records, "rec_loss", "L1 (pixels)"),
                                  series(records, "perceptual_loss", "LPIPS"),
                                  series(records, "clinical_loss", "clinical features"),
                                  series(records, "nll_loss", "weighted sum", "--")],
               log_y=True),
        _panel("codebook", [series(records, "codebook_loss", "codebook loss")], log_y=True),
        _panel("adversarial", [series(records, "g_loss", "generator"),
                               series(records, "d_loss", "discriminator")]) if gan_on else None,
        _panel("code usage", [series(records, "perplexity", "code perplexity (per batch)")]),
        _panel("throughput", [series(records, "images_per_s", "images/s")],
               ylabel="images/s"),
    ]
    return [p for p in panels if p is not None]


def figure(panels: Sequence[Panel], title: str, columns: int = 2) -> Figure:
    """The panels on a grid of `columns`, each PANEL_SIZE inches, x axis in steps."""
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI,
                 layout="constrained")
    fig.suptitle(title)
    steps = [x for p in panels for s in p.series for x in (*s.steps, *p.marks)
             if math.isfinite(x)]
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        for s in panel.series:
            # Few points: each one marked (a point alone between NaN breaks draws no line), by
            # a shape that tells the line style apart.
            points = sum(math.isfinite(x) for x in s.steps)
            marker = ("o" if s.linestyle == "-" else "s") if points <= MARKED_POINTS else None
            ax.plot(s.steps, s.values, linestyle=s.linestyle, label=s.label, color=s.color,
                    marker=marker, markersize=6 if points == 1 else 3)
        if panel.zero_line:
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        for step in panel.marks:
            ax.axvline(step, color="0.35", linestyle="--", linewidth=1.0)
        if not panel.series:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="0.5")
        if panel.log_y and all(v > 0 for s in panel.series for v in s.values
                               if math.isfinite(v)):
            ax.set_yscale("log")
        if steps and min(steps) < max(steps):  # one step range for every panel
            ax.set_xlim(min(steps), max(steps))
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    return fig


def save_png(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    """The figure as a PNG at `path`, written atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def write_stage_curves(stage_dir: str | pathlib.Path, stage: Any) -> pathlib.Path | None:
    """STAGE_DIR/curves.png from STAGE_DIR/metrics.jsonl; None (nothing written) without
    metrics."""
    stage_dir = pathlib.Path(stage_dir)
    path = stage_dir / METRICS_FILE
    panels = stage_panels(read_jsonl(path)) if path.is_file() else []
    if not panels:
        return None
    return save_png(figure(panels, f"stage {stage}"), stage_dir / CURVES_FILE)


def write_vqgan_curves(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """WORKDIR/curves.png from a VQ-GAN run's metrics.jsonl; None without metrics."""
    workdir = pathlib.Path(workdir)
    path = workdir / METRICS_FILE
    panels = vqgan_panels(read_jsonl(path)) if path.is_file() else []
    if not panels:
        return None
    return save_png(figure(panels, "VQ-GAN training"), workdir / CURVES_FILE)
