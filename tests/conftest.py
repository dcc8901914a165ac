"""Test-wide setup: simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os
import pathlib

from xla_flags import xla_flags  # tests/ is on sys.path, as for every test module

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def neox_tokenizer_dir() -> pathlib.Path:
    """The real GPT-NeoX-20B tokenizer, shipped in the package (no network needed)."""
    from llmcxr_jax.text.vocab import gpt_neox_20b_dir

    return gpt_neox_20b_dir()


# pytest-xdist (`--dist loadfile`, pyproject.toml) hands whole modules to the workers in collection
# order. The modules with the suite's longest tests go first, so that neither of CI's two workers is
# left running one of them alone at the end (`.ci/run`'s --durations on a 2-core machine:
# test_readme_commands 385 s in one test, test_multiprocess 215 s, test_run_steps 190 s).
LONGEST_MODULES_FIRST = ("test_readme_commands.py", "test_multiprocess.py", "test_run_steps.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order
