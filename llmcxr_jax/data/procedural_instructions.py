"""Procedurally generated text instructions with checkable answers, in dolly-15k's JSONL format.

Records have dolly's `instruction`, `context`, `response`, `category`, plus `task` (the generator
name). `check(record, text)` says whether a generated answer matches exactly after
normalisation (whitespace, trailing punctuation; case-sensitive), which gives an exact-match language-retention score.
"""

from __future__ import annotations

import re
import string
from typing import Callable

import numpy as np

_WORDS = ("apple", "river", "stone", "cloud", "garden", "pencil", "window", "tiger", "planet",
          "violin", "orange", "silver", "forest", "candle", "bridge", "rocket", "meadow", "pepper",
          "castle", "island", "marble", "shadow", "ladder", "copper", "falcon", "harbor", "lemon",
          "winter", "summer", "button", "cotton", "desert", "engine", "feather", "guitar", "honey")


def _words(rng: np.random.Generator, n: int) -> list[str]:
    return [str(w) for w in rng.choice(_WORDS, size=n, replace=False)]


def _arithmetic(rng):
    a, b = int(rng.integers(2, 1000)), int(rng.integers(2, 1000))
    op = str(rng.choice(["+", "-", "*"]))
    if op == "*":
        a, b = int(rng.integers(2, 100)), int(rng.integers(2, 100))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    name = {"+": "sum", "-": "difference", "*": "product"}[op]
    forms = (f"What is {a} {op} {b}?", f"Compute {a} {op} {b}. Answer with the number only.",
             f"Calculate the {name}: {a} {op} {b}.")
    return forms[int(rng.integers(len(forms)))], "", str(value)


def _sort_numbers(rng):
    nums = [int(v) for v in rng.integers(-50, 200, size=int(rng.integers(4, 9)))]
    desc = bool(rng.random() < 0.3)
    order = "descending" if desc else "ascending"
    return (f"Sort these numbers in {order} order, separated by commas.",
            ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums, reverse=desc))))


def _sort_words(rng):
    ws = _words(rng, int(rng.integers(4, 8)))
    return ("Sort the following words alphabetically, separated by commas.", ", ".join(ws),
            ", ".join(sorted(ws)))


def _count_letter(rng):
    w = " ".join(_words(rng, int(rng.integers(1, 4))))
    letter = str(rng.choice(sorted(set(w.replace(" ", "")))))  # sorted: set order is per process
    return (f'How many times does the letter "{letter}" appear in the text below?', w,
            str(w.count(letter)))


def _count_words(rng):
    ws = [str(v) for v in rng.choice(_WORDS, size=int(rng.integers(3, 12)))]
    return "How many words are in the following sentence?", " ".join(ws), str(len(ws))


def _reverse(rng):
    w = _words(rng, 1)[0]
    return "Reverse the letters of the word below.", w, w[::-1]


def _uppercase(rng):
    w = " ".join(_words(rng, int(rng.integers(2, 5))))
    return "Rewrite the text below in uppercase letters.", w, w.upper()


_UNITS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
          ("hours", "minutes", 60), ("minutes", "seconds", 60), ("liters", "milliliters", 1000),
          ("days", "hours", 24), ("feet", "inches", 12))


def _convert(rng):
    src, dst, factor = _UNITS[int(rng.integers(len(_UNITS)))]
    n = int(rng.integers(1, 100))
    return f"Convert {n} {src} to {dst}. Answer with the number only.", "", str(n * factor)


def _extreme(rng):
    nums = [int(v) for v in rng.integers(-100, 1000, size=int(rng.integers(4, 10)))]
    which = str(rng.choice(["largest", "smallest"]))
    value = max(nums) if which == "largest" else min(nums)
    return f"What is the {which} number in this list?", ", ".join(map(str, nums)), str(value)


def _first_letters(rng):
    ws = _words(rng, int(rng.integers(3, 7)))
    return ("Write the first letter of each word below, joined together.", " ".join(ws),
            "".join(w[0] for w in ws))


TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic, "sort_numbers": _sort_numbers, "sort_words": _sort_words,
    "count_letter": _count_letter, "count_words": _count_words, "reverse": _reverse,
    "uppercase": _uppercase, "unit_conversion": _convert, "min_max": _extreme,
    "first_letters": _first_letters,
}


def generate(n: int, seed: int = 0) -> list[dict]:
    """`n` records, cycling through the tasks in a seeded order. Same seed -> same records."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 6]))
    names = list(TASKS)
    out = []
    for i in range(n):
        task = names[int(rng.integers(len(names)))]
        instruction, context, response = TASKS[task](rng)
        category = "closed_qa" if context else "open_qa"
        out.append({"instruction": instruction, "context": context, "response": response,
                    "category": category, "task": task})
    return out


_PUNCT = re.compile(f"[{re.escape(string.punctuation.replace('-', '').replace(',', ''))}]+$")


def normalize(text: str) -> str:
    """Collapse whitespace and comma spacing, drop trailing punctuation and a leading 'answer:'.

    Case is kept: the uppercase task is only right in upper case.
    """
    text = " ".join(text.strip().split())
    text = re.sub(r"^(the )?answer( is)?:?\s*", "", text, flags=re.I)
    text = re.sub(r"\s*,\s*", ", ", text)
    return _PUNCT.sub("", text).strip()


def check(record: dict, generated: str) -> bool:
    """Exact match of the generated answer (its first non-empty line) with the record's response."""
    lines = [ln for ln in generated.strip().splitlines() if ln.strip()]
    if not lines:
        return False
    want = normalize(record["response"])
    return normalize(lines[0]) == want or normalize(generated) == want
