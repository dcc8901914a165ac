"""SIGTERM to a whole `launch/train.py` run (its process group, as a preempted job gets it) before
the LLM stages: while the phantom world is drawn by its render processes, and while the VQ-GAN
trains. Each exits 0 saying "preempted"; the world leaves nothing half-written (and no process
behind), the VQ-GAN a checkpoint of the step it stopped at, from which the same command resumes.
(The LLM stages' own preemption: tests/test_resume_kill.py.)"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds a run may take to reach the point it is signalled at
EXIT_WITHIN = 60  # seconds after SIGTERM (the old world drawing never exited)
SMALL = ["world.size=64", "world.n_instructions=10", "vqgan.vqgan=test-tiny"]


def _start(workdir: pathlib.Path, sets: list[str], cache: pathlib.Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LLMCXR_CPU_DEVICES": "1",
           "XLA_FLAGS": xla_flags(1),
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    argv = [sys.executable, str(REPO / "launch" / "train.py"), "--config", "tiny", "--workdir",
            str(workdir), "--no-progress"]
    for item in SMALL + sets:
        argv += ["--set", item]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_until(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"never saw {what}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.1)


def _terminate_group(proc: subprocess.Popen) -> str:
    """SIGTERM to the run's whole process group; its output once it has exited."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=EXIT_WITHIN)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running {EXIT_WITHIN} s after SIGTERM: "
                             f"{proc.communicate()[0][-3000:]}") from None


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _steps(metrics: pathlib.Path) -> list[int]:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_sigterm_while_the_world_is_drawn_exits_and_keeps_nothing(tmp_path):
    work = tmp_path / "w"
    # Large enough to be still drawing when signalled (about 10 s on two cores).
    proc = _start(work, ["world.n_studies=2000"], tmp_path / "cache")
    _wait_until(proc, lambda: len(list(work.glob("world.tmp-*/files/*/*/*/*.jpg"))) >= 5,
                "the world's first images")
    out = _terminate_group(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "world: stopped before it was complete" in out and "preempted" in out, out[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["config.json"]  # no world, no temp folder
    deadline = time.monotonic() + 20
    while not _group_gone(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group_gone(proc.pid), "render processes outlived the run"


def test_sigterm_while_the_vqgan_trains_saves_its_step_and_the_rerun_resumes_there(tmp_path):
    work, cache = tmp_path / "w", tmp_path / "cache"
    sets = ["world.n_studies=30", "vqgan.steps=1000", "vqgan.log_every=1"]
    metrics = work / "vqgan_run" / "metrics.jsonl"

    proc = _start(work, sets, cache)
    _wait_until(proc, lambda: _steps(metrics), "a VQ-GAN step")
    out = _terminate_group(proc)
    assert proc.returncode == 0, out[-3000:]
    stopped = _steps(metrics)[-1]
    assert f"vqgan train: stopped at step {stopped} of 1000" in out and "preempted" in out
    checkpoints = sorted(int(p.name) for p in (work / "vqgan_run" / "checkpoints").iterdir()
                         if p.name.isdigit())
    assert checkpoints[-1] == stopped  # the step it stopped at, whatever the save interval
    assert not (work / "vqgan_run" / "vqgan").exists()  # no final model
    record = json.loads((work / "vqgan_run" / "STEP.json").read_text())
    assert record["status"] == "started"

    first_new = len(_steps(metrics))
    proc = _start(work, sets, cache)
    _wait_until(proc, lambda: len(_steps(metrics)) > first_new, "a resumed VQ-GAN step")
    out = _terminate_group(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "world: reusing" in out and f"vqgan train: resumed at step {stopped}" in out
    assert _steps(metrics)[first_new] == stopped + 1
