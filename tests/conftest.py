"""Test-wide setup: simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os
import pathlib

# XLA's lowest backend optimisation level: the suite's programs are many and tiny, so compiling
# them is most of its time, and this level compiles them faster (on a 2-core machine, the shrunk
# `--mesh=4x4` README run took 71 s instead of 95, tests/test_run_steps.py 129 s instead of 159).
# Subprocesses that inherit the environment inherit it; test_readme_commands passes it on.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
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
