"""One run per ``train.out_dir``: a lock file held with ``flock`` while the run trains.

Two runs writing one folder interleave their metrics and overwrite each other's checkpoints. The
first run takes an exclusive ``flock`` on ``OUT/.dali-ba.lock`` and writes who it is into it; a
second run is refused with one line naming the holder. The kernel releases the lock when its holder
dies however it dies (``kill -9``, a crash, a lost node on NFS once the server sees it), so a stale
file never blocks a later run. Under torchrun only global rank 0 takes the lock (the other ranks
learn of a refusal through the set-up agreement in ``loop.py``). ``held_by`` lets ``--check`` look
before any work without taking it. On a filesystem without locks a warning says so and the run goes
on unguarded.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from dali_ba.errors import UserError

LOCK_NAME = ".dali-ba.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirInUse(UserError):
    """Another live run holds ``train.out_dir``."""

    all_ranks = True


def _describe(text: str) -> str:
    return " ".join(text.split()) or "another process"


def _refusal(out: Path, holder: str) -> RunDirInUse:
    return RunDirInUse(f"train.out_dir {out} is in use by another run ({holder}); wait for it to end, stop it, or "
                       "use another train.out_dir")


def held_by(out_dir: str | Path) -> Optional[str]:
    """Who holds ``out_dir`` now (``pid ... on host ..., since ...``), or None; takes nothing."""
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file (or not readable): nobody can hold it through this file
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return _describe(os.read(fd, 4096).decode(errors="replace"))
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The lock of one ``out_dir``; ``acquire`` on rank 0, ``release`` when the run ends."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock (``out_dir`` is created); RunDirInUse if a live run holds it."""
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _refusal(self.out, _describe(holder)) from None
            if exc.errno in _NO_LOCKS:
                print(f"trainers.train: warning: cannot lock {self.out / LOCK_NAME} ({exc.strerror}): a second run "
                      "started on this train.out_dir would not be refused", file=sys.stderr, flush=True)
                return
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
