"""N local JAX processes joined as one multi-host run, for any launch script (one machine's CPU).

Each process gets the environment a pod host would get from its cluster: the coordinator
(127.0.0.1 on a free port, never another interface), the process count and its index
(`parallel/mesh.maybe_initialize_distributed` reads them), its own count of simulated CPU devices
and the heartbeat timeout after which the others give up on a dead process. Their output is
interleaved line by line, each line prefixed `[pI]`.

When one process fails (non-zero exit or killed), the rest get `grace_s` seconds to stop on their
own (JAX's coordination service tells them within the heartbeat timeout), then SIGTERM, then
SIGKILL; the whole group is killed after `timeout_s`. SIGTERM or SIGINT to the launcher is passed on
to every process (each saves a checkpoint at the next step boundary and exits 0).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

from llmcxr_jax.parallel.cpu_devices import COUNT_FLAG
from llmcxr_jax.parallel.mesh import HEARTBEAT_TIMEOUT_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

COORDINATOR_HOST = "127.0.0.1"
TIMED_OUT = 124  # exit code of the group when it ran past its timeout (as `timeout` uses)


def free_port(host: str = COORDINATOR_HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(base: Mapping[str, str], index: int, n_processes: int, devices_per_process: int,
                port: int, heartbeat_timeout_s: int) -> dict[str, str]:
    """The environment of local process `index` of `n_processes`."""
    flags = re.sub(rf"{COUNT_FLAG}=\S+", "", base.get("XLA_FLAGS", "")).strip()
    return {**base, "JAX_COORDINATOR_ADDRESS": f"{COORDINATOR_HOST}:{port}",
            NUM_PROCESSES_ENV: str(n_processes), PROCESS_ID_ENV: str(index),
            HEARTBEAT_TIMEOUT_ENV: str(heartbeat_timeout_s),
            "XLA_FLAGS": f"{flags} {COUNT_FLAG}={devices_per_process}".strip(),
            "JAX_PLATFORMS": base.get("JAX_PLATFORMS", "cpu"), "PYTHONUNBUFFERED": "1"}


def exit_status(code: int) -> int:
    """A child's return code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else code


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


def _pump(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    """Copy a process's output to `out` line by line, each line prefixed."""
    for line in stream:
        with lock:
            out.write(prefix + line.rstrip("\n") + "\n")
            out.flush()


def run_local_processes(command: Sequence[str], n_processes: int, devices_per_process: int, *,
                        timeout_s: float = 3600, grace_s: float = 60, heartbeat_timeout_s: int = 20,
                        env: Mapping[str, str] | None = None, out: IO[str] = sys.stdout,
                        cwd: str | None = None) -> int:
    """Run `command` (argv, e.g. [python, launch/train.py, ...]) as `n_processes` processes of one
    JAX run; returns 0 when all exit 0, else the first failure's code (128 + N for signal N),
    or `TIMED_OUT`."""
    if n_processes < 1 or devices_per_process < 1:
        raise ValueError(f"processes ({n_processes}) and devices per process "
                         f"({devices_per_process}) must be >= 1")
    port = free_port()
    base = dict(os.environ if env is None else env)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for i in range(n_processes):
        proc = subprocess.Popen(
            list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=process_env(base, i, n_processes, devices_per_process, port, heartbeat_timeout_s))
        procs.append(proc)
        with lock:
            out.write(f"[multiprocess] process {i}: pid {proc.pid}\n")
            out.flush()
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", out, lock),
                                daemon=True)
        pump.start()
        pumps.append(pump)

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = _wait(procs, timeout_s, grace_s, out, lock)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for pump in pumps:
            pump.join(timeout=5)
    return code


def _wait(procs: list[subprocess.Popen], timeout_s: float, grace_s: float, out: IO[str],
          lock: threading.Lock) -> int:
    def say(text: str) -> None:
        with lock:
            out.write(f"[multiprocess] {text}\n")
            out.flush()

    deadline = time.monotonic() + timeout_s
    failed: tuple[int, int] | None = None  # (process index, exit code) of the first failure
    stop_at: float | None = None
    terminated = False
    reported: set[int] = set()  # failed processes already named in the output
    while True:
        codes = [p.poll() for p in procs]
        if failed is None:
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None and None in codes:
                stop_at = time.monotonic() + grace_s
                say(f"process {failed[0]} {describe_exit(failed[1])}; the others get "
                    f"{grace_s:g} s to stop")
                reported.add(failed[0])
        # Every failure is named, also when several end between two polls.
        for i, c in enumerate(codes):
            if c not in (None, 0) and i not in reported:
                say(f"process {i} {describe_exit(c)}")
                reported.add(i)
        if None not in codes:
            return exit_status(failed[1]) if failed is not None else 0
        now = time.monotonic()
        if now > deadline:
            say(f"timed out after {timeout_s:g} s; killing processes "
                f"{[i for i, c in enumerate(codes) if c is None]}")
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return TIMED_OUT
        if stop_at is not None and now > stop_at:
            alive = [i for i, c in enumerate(codes) if c is None]
            if not terminated:
                say(f"processes {alive} still running {grace_s:g} s after process {failed[0]} "
                    f"failed: sending SIGTERM")
                for i in alive:
                    procs[i].terminate()
                terminated, stop_at = True, now + 10
            else:
                say(f"processes {alive} ignored SIGTERM: killing them")
                for i in alive:
                    procs[i].kill()
        time.sleep(0.2)
