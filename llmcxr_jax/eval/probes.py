"""Single-finding probes (the paper's first experiments): each direction's headline metrics on the
test items whose study has exactly one finding, and on those with none or with any.

Groups come from the study's CheXpert labels over the classifier's labels, binarised as
`alignment` binarises the truth (U-ones: uncertain (-1) counts as positive, blank as negative),
with "No Finding" aside:

- `single_finding`: exactly one positive label. A study with one certain and one uncertain finding
  has two findings, so it is not a single-finding item.
- `no_finding`: no positive label (Support Devices, which the classifier scores, counts as a
  finding here, although CheXpert's No Finding ignores devices).
- `any_finding`: one or more.

Both directions use the same groups (the same items), so report -> image and image -> report can
be read side by side; each is scored as its headline block is (`alignment.scored_block`: the
findings with both classes among the group's items, with chance levels) with 95 % bootstrap
intervals over the group's items (`alignment.scored_intervals`). Within `single_finding`, a
finding's AUROC asks whether its score separates the items whose one finding it is from the items
with another single finding. `no_finding` has no positives, so AUROC and F1 are undefined there
(`not_measured`); every group carries `finding_called`, the share of its items for which the
model calls any label other than No Finding positive: in `no_finding` the false-alarm rate.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llmcxr_jax.data.labeler import NO_FINDING
from llmcxr_jax.eval import alignment, bootstrap
from llmcxr_jax.eval import classification_metrics as metrics

GROUPS = ("single_finding", "no_finding", "any_finding")
RULE = ("findings per study: the study's CheXpert labels over the classifier's labels, uncertain "
        "(-1) counted as positive (U-ones), No Finding aside")


def finding_positives(label_values: Any, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(binary positives [N, F], the F finding names): `names` less No Finding, U-ones."""
    columns = [j for j, name in enumerate(names) if name != NO_FINDING]
    return alignment.binarize(np.asarray(label_values, np.float64))[:, columns], \
        [names[j] for j in columns]


def group_rows(label_values: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """group -> boolean mask over the N items (see the module docstring)."""
    count = finding_positives(label_values, names)[0].sum(1)
    return {"single_finding": count == 1, "no_finding": count == 0, "any_finding": count >= 1}


def finding_called(y_score: Any, names: Sequence[str], threshold: Any = 0.5) -> np.ndarray:
    """Per item: 1.0 when any label other than No Finding scores >= its threshold, else 0.0."""
    called = metrics.predict(np.asarray(y_score, np.float64), threshold)
    return called[:, [j for j, name in enumerate(names) if name != NO_FINDING]].max(1, initial=0.0)


def group_block(y_true: Any, y_score: Any, names: Sequence[str], rows: np.ndarray,
                threshold: Any = 0.5, *, n_by_finding: dict[str, int], seed: int = bootstrap.SEED,
                with_jaccard: bool = False) -> dict[str, Any]:
    """`alignment.scored_block` of the items `rows`, with its `ci95`, `n_by_finding` and
    `finding_called` (with its own interval); `not_measured` (the reason) in place of the
    metrics when fewer than 2 items, or no finding with both classes, are in the group."""
    rows = np.asarray(rows, bool)
    y = np.asarray(y_true, np.float64)[rows]
    s = np.asarray(y_score, np.float64)[rows]
    n = int(rows.sum())
    out: dict[str, Any] = {"n": n, "n_by_finding": n_by_finding}
    if n == 0:
        return {**out, "not_measured": "no test item in this group"}
    called = finding_called(s, names, threshold)
    out["finding_called"] = float(called.mean())
    out["finding_called_ci95"] = bootstrap.ci95(lambda idx: float(called[idx].mean()), n,
                                                seed=seed)
    if n < 2:
        return {**out, "not_measured": f"{n} test item in this group (need >= 2)"}
    try:
        block = alignment.scored_block(y, s, names, threshold, with_jaccard=with_jaccard)
    except ValueError as err:  # no finding with both classes among the group's items
        return {**out, "not_measured": str(err)}
    return {**block, **out, "ci95": alignment.scored_intervals(y, s, threshold, seed)}


def probe_blocks(label_values: Any, group_names: Sequence[str], y_true: Any, y_score: Any,
                 names: Sequence[str], threshold: Any = 0.5, *, seed: int = bootstrap.SEED,
                 with_jaccard: bool = False) -> dict[str, dict[str, Any]]:
    """group -> `group_block`: the groups from the studies' CheXpert values [N, G] over
    `group_names` (the classifier's labels), the metrics of truth / scores [N, L] over `names`
    (the direction's own labels)."""
    positives, findings = finding_positives(label_values, group_names)
    out = {}
    for group, rows in group_rows(label_values, group_names).items():
        counts = positives[rows].sum(0)
        out[group] = group_block(
            y_true, y_score, names, rows, threshold, seed=seed, with_jaccard=with_jaccard,
            n_by_finding={f: int(c) for f, c in zip(findings, counts) if c > 0})
    return out
