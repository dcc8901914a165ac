"""io_utils.atomic_write: the final name only ever holds a complete file."""

import stat

import pytest

from llmcxr_jax.io_utils import atomic_write, atomic_write_text


def test_writes_and_replaces_with_readable_permissions(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, "first")
    atomic_write(path, lambda tmp: open(tmp, "w").write("second"))
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "params.safetensors"
    atomic_write_text(path, "complete")

    def crash(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["params.safetensors"]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "missing" / "x.json", lambda tmp: None)
