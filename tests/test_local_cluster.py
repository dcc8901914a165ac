"""The local launcher names every process that failed, also when several end between two polls
(a host killed and its peer erroring on the lost connection at once)."""
import io
import sys

from llmcxr_jax.parallel import local_cluster

# Process 1 kills itself; process 0 exits 1 at the same moment (both before the first poll).
_SCRIPT = """
import os, signal, sys, time
index = int(os.environ[{env!r}])
if index == 1:
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(1)
"""


def test_every_failed_process_is_named_even_when_they_end_together():
    out = io.StringIO()
    script = _SCRIPT.format(env=local_cluster.PROCESS_ID_ENV)
    code = local_cluster.run_local_processes([sys.executable, "-c", script], 2, 1,
                                             timeout_s=60, grace_s=5, out=out)
    text = out.getvalue()
    assert code != 0
    assert "process 1 was killed by SIGKILL" in text, text
    assert "process 0 exited with 1" in text, text
