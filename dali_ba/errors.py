"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """Base for expected, explainable failures: bad data, bad paths, bad arguments."""


class DatasetError(UserError, ValueError):
    """The image folder or file list is missing, empty or malformed; names the path at fault."""


class DecodeError(UserError, RuntimeError):
    """DALI could not decode one or more files; names them and suggests `dali-ba data verify`."""

    def __init__(self, message: str, bad_files: list | None = None):
        super().__init__(message)
        self.bad_files = list(bad_files or [])


class StaleLoaderState(ValueError):
    """A loader state saved by a dali-ba version whose DALI graph differs: its DALI checkpoint
    cannot be restored (the data order can: ``set_epoch(epoch, step)``)."""
