"""Output paths checked before any work: a file, a folder, or a place that cannot be written.

Every command that writes (``show --out``, ``data synth OUT``, ``data verify --write-clean-list``,
``bench --json/--plot``, the trainer's ``train.out_dir``) calls these first, so a typo or a full disk
costs one line and exit 2 instead of the hour of work that came before the write. Writability is
probed, not guessed from permission bits (which say nothing about read-only mounts, root, quotas or
a full disk): a small hidden file is written, flushed and removed in the nearest existing folder.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

from dali_ba.errors import UserError

PROBE_BYTES = 4096  # one block: a write that needs space on the disk


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not os.path.lexists(probe):
        probe = probe.parent
    return probe


def probe_write(folder: Path, what: str) -> None:
    """UserError naming ``what`` unless a file can be written in ``folder`` (an existing folder)."""
    probe = folder / f".dali-ba-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise UserError(f"{what}: cannot write in {folder} ({reason})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """The folder ``path`` (``~`` expanded) if it is one or can be created and written; else UserError."""
    out = Path(os.path.expanduser(os.fspath(path)))
    if str(out).strip() == "":
        raise UserError(f"{what}: empty path")
    existing = _nearest_existing(out)
    if existing == out and not out.is_dir():
        raise UserError(f"{what} {out}: exists and is not a folder")
    if not existing.is_dir():
        raise UserError(f"{what} {out}: {existing} is a file, not a folder")
    probe_write(existing, f"{what} {out}")
    return out


def check_output_file(path: Optional[str | os.PathLike], what: str,
                      suffixes: Optional[Sequence[str]] = None) -> Optional[Path]:
    """The file ``path`` (``~`` expanded) if it can be written (its folder created); None for None."""
    if path is None:
        return None
    out = Path(os.path.expanduser(os.fspath(path)))
    if str(path).strip() == "" or str(path).endswith(os.sep):
        raise UserError(f"{what} {path!r}: expected a file path")
    if out.is_dir():
        raise UserError(f"{what} {out}: is a folder, expected a file path")
    if os.path.lexists(out) and not out.is_file():
        raise UserError(f"{what} {out}: exists and is not a regular file")
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise UserError(f"{what} {out}: expected a file name ending in {', '.join(suffixes)}")
    existing = _nearest_existing(out.parent)
    if not existing.is_dir():
        raise UserError(f"{what} {out}: {existing} is a file, not a folder")
    probe_write(existing, f"{what} {out}")
    return out


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """UserError unless the filesystem of ``folder`` (or its nearest existing parent) has ``needed`` bytes."""
    existing = _nearest_existing(Path(folder))
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"{what}: {free / 1e6:,.1f} MB free on the disk of {existing}, {needed / 1e6:,.1f} MB "
                        "needed; free some space or choose another folder")


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Would ``path`` (existing or not) lie in ``folder`` once both are resolved?"""
    a = os.path.realpath(os.path.expanduser(os.fspath(path)))
    b = os.path.realpath(os.path.expanduser(os.fspath(folder)))
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)
