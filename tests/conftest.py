"""Test-wide setup: simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NEOX_TOKENIZER_DIR = SHARED_DATA / "gpt-neox-20b"


@pytest.fixture(scope="session")
def neox_tokenizer_dir() -> pathlib.Path:
    """The real GPT-NeoX-20B tokenizer shipped in ../shared/data (no network needed)."""
    path = NEOX_TOKENIZER_DIR / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the tests need ../shared/data beside the repo")
    return NEOX_TOKENIZER_DIR
