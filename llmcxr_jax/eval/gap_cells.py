"""Where in the image a report helps: the report -> image conditioning gap over the VQ-GAN grid.

`conditioning.cell_gaps` lays a gap result's per-code gaps out on the grid (mismatched - true
report NLL of the code in each cell, nats, mean over pairs). This module makes eval.json's block
of them, over all test pairs and over the pairs whose study has each finding (enough of them to
mean something), and draws the grids side by side as one PNG on a shared colour scale centred at
0 (red: the true report lowers the code's loss there).

The codes are teacher-forced: a cell's gap is what the report adds beyond the true codes before
it in raster order, which already show much of the finding, so the first cells drawn carry more
of the gap than their content alone would.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from llmcxr_jax.eval.conditioning import GapResult, cell_gaps
from llmcxr_jax.train import curves as curves_lib

MIN_PAIRS = 20  # a finding's grid is drawn from at least this many pairs with it
PANEL_INCHES = 2.4


def cell_gap_block(result: GapResult, tokens_per_image: int, positive: np.ndarray,
                   names: Sequence[str], min_pairs: int = MIN_PAIRS) -> dict[str, Any]:
    """{"side", "all": {"n", "gap"}, "findings": {name: {"n", "gap"}}}: the grids (nested
    lists, rows first) over every scored pair and over the scored pairs whose study has each
    finding (`positive` [n_pairs_given, L], 0/1, in the order of the pairs given), for findings
    with at least `min_pairs` such pairs."""
    scored = np.asarray(result.pairs, np.int64)
    grid = cell_gaps(result, tokens_per_image)
    block: dict[str, Any] = {"side": grid.shape[0],
                             "all": {"n": len(scored), "gap": grid.tolist()}, "findings": {}}
    has = np.asarray(positive, bool)[scored]
    for j, name in enumerate(names):
        if has[:, j].sum() >= min_pairs:
            block["findings"][name] = {
                "n": int(has[:, j].sum()),
                "gap": cell_gaps(result, tokens_per_image, has[:, j]).tolist()}
    return block


def plot(block: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """One heat map per grid of `cell_gap_block`'s block (all pairs first), on one colour scale
    centred at 0, each titled with its pairs' count and mean gap."""
    grids = [("all test pairs", block["all"])] + list(block["findings"].items())
    values = np.concatenate([np.ravel(g["gap"]) for _, g in grids])
    bound = float(max(np.abs(values).max(), 1e-6))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    cols = min(len(grids), 6)
    rows = -(-len(grids) // cols)
    fig = Figure(figsize=(PANEL_INCHES * cols + 0.8, PANEL_INCHES * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, (title, g) in zip(axes.ravel(), grids):
        gap = np.asarray(g["gap"])
        image = ax.imshow(gap, cmap="RdBu_r", norm=norm)
        ax.set_title(f"{title}\nn {g['n']}, mean {gap.mean():.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(grids):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8,
                 label="gap per code, nats (mismatched - true report)")
    fig.suptitle("report -> image: where the true report lowers each code's loss (test pairs)",
                 fontsize=9)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return curves_lib.save_png(fig, path)


__all__ = ["MIN_PAIRS", "cell_gap_block", "plot"]
