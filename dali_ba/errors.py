"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits 2; so does a usage
error (``OneLineArgumentParser``)."""
from __future__ import annotations

import argparse
from typing import NoReturn


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


class LoaderOutOfMemory(UserError, MemoryError):
    """DALI ran out of host or GPU memory while loading; the message names the batch shape."""


class LoaderStateError(UserError, ValueError):
    """A saved loader state does not fit this loader (another dataset shard, batch, seed, or
    graph settings DALI cannot restore into); the message says what differs."""


def one_line(message: str) -> str:
    """``message`` on one line: a line break (say, in a file name) shown as ``\\n``."""
    return str(message).strip().replace("\r", "\\r").replace("\n", "\\n")


def make_console_safe() -> None:
    """Print any file name: bytes that are not UTF-8 (kept by Python as surrogate escapes) are
    shown as escapes instead of stopping the program with a UnicodeEncodeError."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a text stream we can reconfigure (captured, closed)
            pass


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``prog: error: ... (see prog --help)``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
