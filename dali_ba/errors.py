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

    @staticmethod
    def matches(exc: BaseException) -> bool:
        text = str(exc).lower()
        return any(w in text for w in ("bad_alloc", "out of memory", "cudaerrormemoryallocation",
                                       "can't allocate memory"))

    @classmethod
    def of(cls, loader, exc: BaseException, reason: str) -> "LoaderOutOfMemory":
        """The error for ``loader`` (a BatchAugmentLoader or EvalLoader) whose DALI pipeline failed with ``exc``."""
        import re

        views = getattr(loader, "num_views", getattr(loader, "views", 1))
        size = loader.batch_size * views * 3 * loader.image_size ** 2 * (2 if loader.dtype == "float16" else 4)
        operator = re.search(r"operator `([^`]+)`", str(exc))
        return cls(f"DALI ran out of memory{f' in {operator.group(1)}' if operator else ''} ({reason}) loading a batch "
                   f"of {loader.batch_size} images × {views} view(s) of {loader.image_size}×{loader.image_size} px "
                   f"({size / 1e9:.3g} GB as {loader.dtype}, up to {loader.prefetch + 1} such batches in flight); "
                   "lower batch_size, num_views, image_size or prefetch")


class LoaderStateError(UserError, ValueError):
    """A saved loader state does not fit this loader (another dataset shard, batch, seed, or
    graph settings DALI cannot restore into); the message says what differs."""


def dali_error_line(exc: BaseException) -> str:
    """The meaningful line of a DALI error raised by a pipeline (after its operator traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    lines = [line for line in lines if not line.startswith(("Critical error", "Current pipeline object", "Error in"))]
    return lines[0].strip(": ") if lines else type(exc).__name__


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
