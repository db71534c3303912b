"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """Base for expected, explainable failures: bad data, bad paths, bad arguments."""


class DatasetError(UserError, ValueError):
    """The image folder or file list is missing, empty or malformed; names the path at fault."""


class ConfigError(UserError, ValueError):
    """A config file, key or value is wrong; the message says which and what was expected."""


class DecodeError(UserError, RuntimeError):
    """DALI could not decode one or more files; names them and suggests `dali-ba data verify`."""

    def __init__(self, message: str, bad_files: list | None = None):
        super().__init__(message)
        self.bad_files = list(bad_files or [])


class LoaderStateError(UserError, ValueError):
    """A saved loader state does not fit this loader (another dataset shard, batch, seed, or
    graph settings DALI cannot restore into); the message says what differs."""
