"""Counting records that a reader skips, by reason, with a few examples of each."""

from __future__ import annotations

import collections
from typing import Iterable, Mapping

MAX_EXAMPLES_PER_REASON = 5


class TooManySkipped(ValueError):
    """A source whose bad records exceed the allowed fraction: more likely a wrong file (a wrong
    delimiter, encoding or folder) than a few bad records."""


class SkipCounter:
    """Counts skipped records per reason and keeps the first few details (file:line, ids).

    A data set is expected to hold a few bad records; readers skip them and count them here
    instead of failing, and `summary()` says what was dropped and where. Readers also name the
    source (a file, a folder) of each record they read (`saw`) and of each bad one (`add(...,
    source=)`), so that `check_fraction` can stop on a source that is mostly bad. Records left
    out by a filter (e.g. not in stage 2's subset) are counted without a source: not bad data.
    """

    def __init__(self, name: str = "records") -> None:
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.seen: collections.Counter[str] = collections.Counter()  # records read per source
        self.bad: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)  # per source: reason -> bad records

    def saw(self, source: str, n: int = 1) -> None:
        """Counts `n` records read from `source` (good or bad)."""
        self.seen[source] += n

    def add(self, reason: str, detail: str = "", source: str | None = None) -> None:
        """Counts one skipped record under `reason`; `detail` says which (e.g. 'file.csv:12');
        `source` (the file it was read from) marks it as bad data of that source."""
        self.counts[reason] += 1
        if detail and len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(detail)
        if source is not None:
            self.bad[source][reason] += 1

    def update(self, other: "SkipCounter") -> None:
        """Adds another counter's counts, examples and per-source tallies to this one."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = MAX_EXAMPLES_PER_REASON - len(self.examples[reason])
            self.examples[reason].extend(other.examples.get(reason, [])[:max(room, 0)])
        self.seen.update(other.seen)
        for source, reasons in other.bad.items():
            self.bad[source].update(reasons)

    def check_fraction(self, limit: float, flag: str = "data.max_skip_fraction") -> None:
        """Raise `TooManySkipped` (one line: the source, the fraction, the most common reason)
        for the source with the largest fraction of bad records, if that exceeds `limit`."""
        worst = None
        for source, reasons in self.bad.items():
            n_bad = sum(reasons.values())
            fraction = n_bad / max(self.seen[source], n_bad, 1)
            if fraction > limit and (worst is None or fraction > worst[1]):
                worst = (source, fraction, n_bad, reasons)
        if worst is None:
            return
        source, fraction, n_bad, reasons = worst
        reason, n = reasons.most_common(1)[0]
        example = f", e.g. {self.examples[reason][0]}" if self.examples.get(reason) else ""
        raise TooManySkipped(
            f"{source}: {fraction:.1%} of its {max(self.seen[source], n_bad)} records are bad "
            f"({n_bad} skipped, most often {reason}: {n}{example}), more than {flag}={limit:g}: "
            f"check the file (a wrong delimiter, encoding or folder?), or allow more with "
            f"--set {flag}=...")

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
