"""Run any launch script as N local JAX processes of one multi-host run (CPU, one machine).

    python launch/multiprocess.py --processes 2 --devices-per-process 2 -- \\
        launch/train.py --config tiny --mesh 2x2

Each process is what one host of a TPU pod is: `jax.distributed.initialize` joins them through a
coordinator on 127.0.0.1 (a free port), CPU collectives go over gloo, each reads its own shard of
the data, process 0 alone writes logs, metrics, config and samples, and every process writes its
shards of each checkpoint. The same variables start processes by hand (or on several machines):
JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i, and optionally
LLMCXR_HEARTBEAT_TIMEOUT_S. Output lines are prefixed [pI]. A process that dies makes the others
stop with an error (their next collective fails, or the heartbeat timeout passes); what still runs
--grace seconds later is terminated. The exit code is the first failure's (128 + N for signal N),
or 124 after --timeout. SIGTERM to this launcher reaches every process (a preemption: all save the
same step and exit 0; the same command resumes).
"""

from __future__ import annotations

import pathlib
import sys

from llmcxr_jax import cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1:]
    parser = cli.parser(__doc__)
    parser.usage = "%(prog)s [options] -- SCRIPT.py [its flags]"
    parser.add_argument("--processes", type=cli.positive_int, default=2,
                        help="number of processes (hosts)")
    parser.add_argument("--devices-per-process", type=cli.positive_int, default=2,
                        help="simulated CPU devices in each process")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds after which every process is killed (exit 124)")
    parser.add_argument("--grace", type=float, default=60,
                        help="seconds the others get to stop after one process fails")
    parser.add_argument("--heartbeat-timeout", type=cli.positive_int, default=20,
                        help="seconds without a heartbeat after which a process counts as dead")
    args = parser.parse_args(own)
    if not command or not command[0].endswith(".py") or not pathlib.Path(command[0]).is_file():
        raise cli.UsageError(f"after --, give a launch script and its flags (e.g. -- "
                             f"launch/train.py --config tiny); got {' '.join(command) or 'nothing'}")

    from llmcxr_jax.parallel.local_cluster import run_local_processes

    return run_local_processes([sys.executable, *command], args.processes,
                               args.devices_per_process, timeout_s=args.timeout,
                               grace_s=args.grace, heartbeat_timeout_s=args.heartbeat_timeout)


if __name__ == "__main__":
    cli.run(main)
