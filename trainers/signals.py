"""Signals that stop a run at the next step boundary, after a checkpoint.

- SIGTERM / SIGUSR1 (SLURM pre-emption): checkpoint, ``PREEMPTED`` marker, exit 0 (the job is requeued).
- SIGINT (Ctrl-C): checkpoint, exit 130 (the shell's code for an interrupted command), no marker.
  SIGHUP (the terminal went away) the same, exit 129, unless it is ignored (``nohup``: left so).
  While the run trains, a write to a terminal that hung up (EIO) or a pipe whose reader left (EPIPE)
  is dropped rather than stopping the run before its checkpoint.
  The first Ctrl-C prints one line at once (a raw write: the handler may run in the middle of a
  print) saying that the run will stop after this step. Another SIGINT within ``GRACE_S`` is the
  same Ctrl-C seen twice (a terminal signals the whole process group, and torchrun forwards what it
  gets to its workers); a later one stops the process at once, by the signal, without a checkpoint:
  what is on disk stays valid (checkpoints are written atomically). Python runs signal handlers
  between bytecodes, so that second stop waits for a call into C (a DALI batch, a collective) to
  return.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
from typing import List, Optional

INTERRUPTED_EXIT = 130


class StopSignal:
    """Installs the handlers; ``received``: the first stop signal's name; ``interrupted``: SIGINT seen."""

    PREEMPT = (signal.SIGTERM, signal.SIGUSR1)
    INTERRUPT = (signal.SIGINT, signal.SIGHUP)
    GRACE_S = 1.0

    def __init__(self, announce: bool = True):
        self.received: Optional[str] = None
        self.interrupted = False
        self.exit_code = INTERRUPTED_EXIT
        self._first_interrupt: Optional[float] = None
        self._announce = announce
        handlers = {s: self._preempt for s in self.PREEMPT}
        handlers.update({s: self._interrupt for s in self.INTERRUPT if signal.getsignal(s) is not signal.SIG_IGN})
        self._previous = {s: signal.signal(s, h) for s, h in handlers.items()}
        self._streams = (sys.stdout, sys.stderr)
        tolerate_lost_output()  # before the progress bar takes sys.stderr

    def _preempt(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def _interrupt(self, signum, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            _away_from_a_lost_terminal()
        if self._first_interrupt is None:
            self._first_interrupt, self.interrupted, self.exit_code = now, True, 128 + signum
            self.received = self.received or name
            if self._announce:
                try:
                    os.write(2, f"\ntrainers.train: interrupted ({name}): saving a checkpoint after the current step; "
                                "interrupt again to stop at once without it\n".encode())
                except OSError:  # no terminal any more (SIGHUP)
                    pass
        elif now - self._first_interrupt > self.GRACE_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def flags(self) -> List[float]:
        """[pre-empted, interrupted] for the per-step agreement (summed over ranks)."""
        return [float(self.received is not None and not self.interrupted), float(self.interrupted)]

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        sys.stdout, sys.stderr = self._streams


class _Tolerant:
    """A text stream whose writes to a terminal that hung up (EIO) or a pipe whose reader left (EPIPE)
    are dropped instead of raising: the run then still reaches its checkpoint."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EPIPE):
                raise
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EPIPE):
                raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tolerate_lost_output() -> None:
    """Wrap sys.stdout and sys.stderr in ``_Tolerant`` (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Tolerant):
            setattr(sys, name, _Tolerant(stream))


def _away_from_a_lost_terminal() -> None:
    """stdout/stderr that are a terminal which hung up now go to /dev/null: a write there would fail
    (EIO) and stop the run before its checkpoint. Output redirected to files is left alone."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            if os.isatty(fd):
                os.dup2(null, fd)
    finally:
        os.close(null)
