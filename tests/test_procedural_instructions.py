"""Procedural instructions: answers are right, the checker is exact, generation is seeded."""

import json
import re

from llmcxr_jax.data.procedural_instructions import TASKS, check, generate, normalize


def _recompute(r: dict) -> str:
    """An independent solver for each task, from the visible instruction and context."""
    ins, ctx = r["instruction"], r["context"]
    task = r["task"]
    if task == "arithmetic":
        a, op, b = re.search(r"(-?\d+) ([-+*]) (-?\d+)", ins).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if task == "sort_numbers":
        nums = [int(v) for v in ctx.split(",")]
        return ", ".join(map(str, sorted(nums, reverse="descending" in ins)))
    if task == "sort_words":
        return ", ".join(sorted(w.strip() for w in ctx.split(",")))
    if task == "count_letter":
        return str(ctx.count(re.search(r'letter "(.)"', ins).group(1)))
    if task == "count_words":
        return str(len(ctx.split()))
    if task == "reverse":
        return ctx[::-1]
    if task == "uppercase":
        return ctx.upper()
    if task == "unit_conversion":
        n, src, dst = re.search(r"Convert (\d+) (\w+) to (\w+)", ins).groups()
        factor = {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100,
                  ("kilograms", "grams"): 1000, ("hours", "minutes"): 60,
                  ("minutes", "seconds"): 60, ("liters", "milliliters"): 1000,
                  ("days", "hours"): 24, ("feet", "inches"): 12}[(src, dst)]
        return str(int(n) * factor)
    if task == "min_max":
        nums = [int(v) for v in ctx.split(",")]
        return str(max(nums) if "largest" in ins else min(nums))
    if task == "first_letters":
        return "".join(w[0] for w in ctx.split())
    raise AssertionError(task)


def test_answers_are_correct_and_all_tasks_appear():
    records = generate(600, seed=1)
    assert {r["task"] for r in records} == set(TASKS)
    for r in records:
        assert r["response"] == _recompute(r), r
        assert r["category"] in ("open_qa", "closed_qa")
        json.dumps(r)


def test_deterministic_per_seed():
    assert generate(50, seed=3) == generate(50, seed=3)
    assert generate(50, seed=3) != generate(50, seed=4)


def test_check_exact_match_after_normalisation():
    r = {"instruction": "What is 2 + 3?", "context": "", "response": "5", "category": "open_qa"}
    assert check(r, "5") and check(r, " 5.\n") and check(r, "The answer is 5") and check(r, "5\nmore")
    assert not check(r, "6") and not check(r, "15") and not check(r, "") and not check(r, "5 apples")
    s = {"instruction": "Sort", "context": "", "response": "-3, 1, 20", "category": "closed_qa"}
    assert check(s, "-3,1,20") and check(s, "-3 , 1, 20.") and not check(s, "1, -3, 20")
    u = {"instruction": "Upper", "context": "", "response": "CLOUD RIVER", "category": "closed_qa"}
    assert check(u, "CLOUD RIVER") and not check(u, "cloud river")  # case matters
    assert normalize("  Answer:  A,B ") == "A, B"
