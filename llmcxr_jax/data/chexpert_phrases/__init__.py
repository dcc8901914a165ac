"""The CheXpert labeler's mention and unmention phrase lists (MIT: README.md, LICENSE.txt)."""

from __future__ import annotations

import importlib.resources

KINDS = ("mention", "unmention")


def load(kind: str) -> dict[str, tuple[str, ...]]:
    """{observation: phrases} of the `mention` or `unmention` lists, observations title-cased
    from the file stems ("lung_opacity.txt" -> "Lung Opacity"), phrases lower-cased, in file order.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    out: dict[str, tuple[str, ...]] = {}
    for entry in sorted(importlib.resources.files(__package__).joinpath(kind).iterdir(),
                        key=lambda e: e.name):
        if entry.name.endswith(".txt"):
            phrases = [line.strip().lower() for line in entry.read_text("utf-8").splitlines()]
            out[entry.name[:-4].replace("_", " ").title()] = tuple(p for p in phrases if p)
    return out
