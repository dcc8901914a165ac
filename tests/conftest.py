"""Test-wide setup: simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def neox_tokenizer_dir() -> pathlib.Path:
    """The real GPT-NeoX-20B tokenizer, shipped in the package (no network needed)."""
    from llmcxr_jax.text.vocab import gpt_neox_20b_dir

    return gpt_neox_20b_dir()
