"""Signals that stop a run at the next step boundary, after a checkpoint.

- SIGTERM / SIGUSR1 (SLURM pre-emption): checkpoint, ``PREEMPTED`` marker, exit 0 (the job is requeued).
- SIGINT (Ctrl-C): checkpoint, exit 130 (the shell's code for an interrupted command), no marker.
  The first Ctrl-C prints one line at once (a raw write: the handler may run in the middle of a
  print) saying that the run will stop after this step. Another SIGINT within ``GRACE_S`` is the
  same Ctrl-C seen twice (a terminal signals the whole process group, and torchrun forwards what it
  gets to its workers); a later one stops the process at once, by the signal, without a checkpoint:
  what is on disk stays valid (checkpoints are written atomically). Python runs signal handlers
  between bytecodes, so that second stop waits for a call into C (a DALI batch, a collective) to
  return.
"""
from __future__ import annotations

import os
import signal
import time
from typing import List, Optional

INTERRUPTED_EXIT = 130


class StopSignal:
    """Installs the handlers; ``received``: the first stop signal's name; ``interrupted``: SIGINT seen."""

    PREEMPT = (signal.SIGTERM, signal.SIGUSR1)
    GRACE_S = 1.0

    def __init__(self, announce: bool = True):
        self.received: Optional[str] = None
        self.interrupted = False
        self._first_interrupt: Optional[float] = None
        self._announce = announce
        handlers = {s: self._preempt for s in self.PREEMPT}
        handlers[signal.SIGINT] = self._interrupt
        self._previous = {s: signal.signal(s, h) for s, h in handlers.items()}

    def _preempt(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def _interrupt(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first_interrupt is None:
            self._first_interrupt, self.interrupted = now, True
            self.received = self.received or "SIGINT"
            if self._announce:
                os.write(2, b"\ntrainers.train: interrupted (SIGINT): saving a checkpoint after the current step; "
                            b"interrupt again to stop at once without it\n")
        elif now - self._first_interrupt > self.GRACE_S:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    def flags(self) -> List[float]:
        """[pre-empted, interrupted] for the per-step agreement (summed over ranks)."""
        return [float(self.received is not None and not self.interrupted), float(self.interrupted)]

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
