"""Preemption: SIGTERM (and SIGINT) ask the run to checkpoint at the next step boundary and exit 0.

A signal handler only sets a flag; the train loop calls `should_stop(step)` once per step, and on
True saves a checkpoint (`Checkpointer.save(..., force=True)`, then `close()`) and returns
normally. A second SIGINT (Ctrl-C twice) interrupts at once.

On a multi-host run every process must stop at the same step, or the collective save would hang:
there `should_stop` asks JAX's preemption sync manager (`multihost_utils.
reached_preemption_sync_point`, which the coordination service drives from the TPU maintenance /
SIGTERM notice) and, where that is not available, all-gathers the local flags so that a signal on
any host stops every host at the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Installs the handlers on `start()` (or `with`), puts the previous ones back on `stop()`."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self._flag = threading.Event()
        self._received: int | None = None
        self._previous: dict[int, Any] = {}
        self._sync_point_works: bool | None = None  # multi-host: None until first tried

    # --------------------------------------------------------------------------- handlers

    def start(self) -> "PreemptionWatcher":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionWatcher.start() must run in the main thread "
                               "(Python delivers signals only there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def stop(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionWatcher":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._flag.is_set():
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._received = signum
        self._flag.set()
        # Logging from a handler is safe enough here: it runs between bytecodes of the main thread.
        log.warning("received %s: will save a checkpoint at the next step boundary and exit",
                    signal.Signals(signum).name)

    # ------------------------------------------------------------------------------ query

    @property
    def received(self) -> int | None:
        """The signal that asked to stop (None if none did)."""
        return self._received

    def request_stop(self) -> None:
        """Ask for a stop as a signal would (tests, or a wall-clock limit)."""
        self._flag.set()

    def stop_requested(self) -> bool:
        """This process's own flag, asking no other host: for work one process does alone (the
        world, the clinical classifier), after which all ask `should_stop` together."""
        return self._flag.is_set()

    def should_stop(self, step: int) -> bool:
        """True when the loop should checkpoint `step` and exit; the same answer on every host."""
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        return self._multihost_should_stop(step, local)

    def _multihost_should_stop(self, step: int, local: bool) -> bool:
        from jax.experimental import multihost_utils

        if self._sync_point_works is not False:
            try:
                reached = bool(multihost_utils.reached_preemption_sync_point(step))
                self._sync_point_works = True
            except (RuntimeError, AttributeError) as err:  # sync manager not set up
                if self._sync_point_works:
                    raise
                log.info("preemption sync point unavailable (%s); all-gathering stop flags", err)
                self._sync_point_works = False
            else:
                if reached:
                    return True
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))
