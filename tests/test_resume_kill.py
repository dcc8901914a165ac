"""Resume exactness with real processes: SIGTERM saves at the step boundary and exits 0; SIGKILL
after a checkpoint, then a restart, continues with exactly the uninterrupted run's per-step losses,
ignoring a half-written checkpoint.

Four runs of `tests/resume_driver.py` (a tiny stage through `train.loop.run_stage`, one device)
share a persistent compilation cache, so only the first one compiles:

    reference  8 steps uninterrupted
    cut        SIGTERM at step 3                    -> exit 0, checkpoint 3 (not a save step)
    resumed    from 3; SIGKILL right after step 6   -> step 6's async save likely half-written
    finished   from the newest finished checkpoint  -> done at 8

and the losses each run logged (metrics.jsonl, every step) are compared with the reference's.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llmcxr_jax.train.metrics import read_jsonl
from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "resume_driver.py"
STEPS = 8
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax 0.12: `<step>.orbax-checkpoint-tmp`, items inside
TIMEOUT = 300


def _env(cache: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=xla_flags(1),
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _start(stage_dir: pathlib.Path, cache: pathlib.Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(stage_dir), "--steps", str(STEPS),
         "--step-delay", str(delay)],
        cwd=REPO, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    """Read the driver's stdout until it prints `step <step>`; returns the lines read."""
    lines = []
    deadline = time.monotonic() + TIMEOUT
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.strip() == f"step {step}":
            return lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"the driver never reached step {step}; stdout {lines[-5:]}, "
                         f"stderr {proc.stderr.read()[-3000:]}")


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    return out, err


def _records_from(stage_dir: pathlib.Path, first_line: int) -> dict[int, float]:
    """step -> loss of the metrics.jsonl records from line `first_line` on (one run's records)."""
    path = stage_dir / "metrics.jsonl"
    records = read_jsonl(path)[first_line:] if path.exists() else []
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def _n_records(stage_dir: pathlib.Path) -> int:
    path = stage_dir / "metrics.jsonl"
    return len(read_jsonl(path)) if path.exists() else 0


def _checkpoints(stage_dir: pathlib.Path) -> tuple[list[int], list[str]]:
    """(finished step directories, half-written orbax temporary directories)."""
    root = stage_dir / "checkpoints"
    names = [p.name for p in root.iterdir()] if root.exists() else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def _assert_same_losses(got: dict[int, float], reference: dict[int, float]) -> None:
    assert got and set(got) <= set(reference), (got, reference)
    steps = sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps],
                               rtol=1e-6, err_msg=f"per-step losses at steps {steps}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four runs of the module docstring; what each left behind, for the tests."""
    root = tmp_path_factory.mktemp("resume_kill")
    cache = root / "jax_cache"
    out = {}

    ref = subprocess.run([sys.executable, str(DRIVER), str(root / "reference"), "--steps",
                          str(STEPS)], cwd=REPO, env=_env(cache), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out["reference"] = _records_from(root / "reference", 0)

    stage = root / "stage"
    cut = _start(stage, cache, delay=0.5)
    _wait_for_step(cut, 3)
    cut.send_signal(signal.SIGTERM)  # lands while step 3 pauses, before step 4 starts
    stdout, stderr = _finish(cut)
    out["cut"] = dict(returncode=cut.returncode, stdout=stdout, stderr=stderr,
                      checkpoints=_checkpoints(stage), losses=_records_from(stage, 0),
                      done=(stage / "DONE.json").exists())

    first = _n_records(stage)
    resumed = _start(stage, cache, delay=0.5)
    _wait_for_step(resumed, 6)  # step 6's checkpoint save has just been started (asynchronous)
    os.kill(resumed.pid, signal.SIGKILL)
    _finish(resumed)
    out["killed"] = dict(returncode=resumed.returncode, checkpoints=_checkpoints(stage),
                         losses=_records_from(stage, first))

    finished_steps, half_written = out["killed"]["checkpoints"]
    planted = None
    if not half_written:  # the save finished before the kill: leave what a kill mid-save leaves
        planted = stage / "checkpoints" / f"{finished_steps[-1] + 2}{TMP_MARK}"
        shutil.copytree(stage / "checkpoints" / str(finished_steps[-1]), planted)
        (planted / "commit_success.txt").unlink(missing_ok=True)
    out["planted"] = planted

    first = _n_records(stage)
    final = subprocess.run([sys.executable, str(DRIVER), str(stage), "--steps", str(STEPS)],
                           cwd=REPO, env=_env(cache), capture_output=True, text=True,
                           timeout=TIMEOUT)
    out["final"] = dict(returncode=final.returncode, stdout=final.stdout, stderr=final.stderr,
                        losses=_records_from(stage, first), checkpoints=_checkpoints(stage),
                        done=json.loads((stage / "DONE.json").read_text())
                        if (stage / "DONE.json").exists() else None)
    return out


def test_reference_run_logs_every_step(runs):
    assert sorted(runs["reference"]) == list(range(1, STEPS + 1))
    assert runs["reference"][STEPS] < runs["reference"][1]  # it learns


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(runs):
    cut = runs["cut"]
    assert cut["returncode"] == 0, cut["stderr"][-3000:]
    status, step = re.search(r"result (\w+) (\d+)", cut["stdout"]).groups()
    assert status == "preempted" and int(step) >= 3
    finished, half_written = cut["checkpoints"]
    # Step 3 is not a periodic save step (every 2): its checkpoint is the preemption save.
    assert finished[-1] == int(step) and not half_written and not cut["done"]
    assert max(cut["losses"]) == int(step)
    _assert_same_losses(cut["losses"], runs["reference"])


def test_sigkill_then_restart_gives_the_uninterrupted_losses(runs):
    killed, final = runs["killed"], runs["final"]
    assert killed["returncode"] == -signal.SIGKILL
    _assert_same_losses(killed["losses"], runs["reference"])
    assert 6 <= max(killed["losses"]) < STEPS  # killed in step 6's pause (later only if slow)

    assert final["returncode"] == 0, final["stderr"][-3000:]
    assert "result done 8" in final["stdout"]
    # It resumed from the newest finished checkpoint, not from a half-written one ...
    finished_after_kill, _ = killed["checkpoints"]
    assert min(final["losses"]) == finished_after_kill[-1] + 1
    assert sorted(final["losses"]) == list(range(finished_after_kill[-1] + 1, STEPS + 1))
    # ... and continued exactly as the run that was never interrupted.
    _assert_same_losses(final["losses"], runs["reference"])
    assert final["done"]["step"] == STEPS
    np.testing.assert_allclose(final["done"]["loss"], runs["reference"][STEPS], rtol=1e-6)


def test_half_written_checkpoint_is_ignored_and_cleaned_up(runs):
    _, half_written_after_kill = runs["killed"]["checkpoints"]
    assert half_written_after_kill or runs["planted"] is not None
    finished, half_written = runs["final"]["checkpoints"]
    assert not half_written  # removed when the restarted run opened the directory
    assert finished[-1] == STEPS
