"""Counting records that a reader skips, by reason, with a few examples of each."""

from __future__ import annotations

import collections
from typing import Iterable, Mapping

MAX_EXAMPLES_PER_REASON = 5


class SkipCounter:
    """Counts skipped records per reason and keeps the first few details (file:line, ids).

    A data set is expected to hold a few bad records; readers skip them and count them here
    instead of failing, and `summary()` says what was dropped and where.
    """

    def __init__(self, name: str = "records") -> None:
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, reason: str, detail: str = "") -> None:
        """Counts one skipped record under `reason`; `detail` says which (e.g. 'file.csv:12')."""
        self.counts[reason] += 1
        if detail and len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(detail)

    def update(self, other: "SkipCounter") -> None:
        """Adds another counter's counts and examples to this one."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = MAX_EXAMPLES_PER_REASON - len(self.examples[reason])
            self.examples[reason].extend(other.examples.get(reason, [])[:max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        """One readable block: the total, then one line per reason with its first examples."""
        if not self.counts:
            return f"{self.name}: nothing skipped"
        lines = [f"{self.name}: {self.total} skipped"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = self.examples.get(reason, [])
            more = f" (e.g. {', '.join(ex)}{', ...' if n > len(ex) else ''})" if ex else ""
            lines.append(f"  {reason}: {n}{more}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, {self.as_dict()})"


def merged(counters: Iterable[SkipCounter], name: str = "records") -> SkipCounter:
    """A new counter holding the sum of `counters`."""
    out = SkipCounter(name)
    for c in counters:
        out.update(c)
    return out


def from_counts(counts: Mapping[str, int], name: str = "records") -> SkipCounter:
    """A counter holding the given counts (no examples)."""
    out = SkipCounter(name)
    out.counts.update(counts)
    return out
