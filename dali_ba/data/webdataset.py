"""Write a WebDataset tar shard and its DALI index in one pass, without reading the tar back.

A shard is a POSIX (ustar) tar in which each sample is a run of members ``<key>.<ext>`` that share
the key. DALI's ``fn.readers.webdataset(index_paths=...)`` starts without scanning the tars when each
has an index: the format DALI's ``wds2idx`` writes (version ``v1.2``) is a first line
``v1.2 <number of samples>`` and then one line per sample, ``<ext> <data offset> <size> <member name>``
for each of its members, offsets in bytes from the start of the tar (multiples of 512). We know every
offset while writing, so the index comes for free.

Headers carry fixed metadata (mtime 0, owner 0, mode 0644), so the same samples give the same bytes and
a shard's sha256 identifies its content. The archive ends with the format's two zero blocks, without
tar's padding to a 10 KiB record, so a shard's size is exactly what ``projected_size`` predicts.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

BLOCK = 512
END_OF_ARCHIVE = 2 * BLOCK
INDEX_VERSION = "v1.2"
_NAME_PART = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots (DALI splits key and ext at the first dot), no spaces


def member_size(data_bytes: int) -> int:
    """Bytes one tar member takes: a header block plus the data padded to whole blocks."""
    return BLOCK + -(-data_bytes // BLOCK) * BLOCK


def sample_size(parts: Mapping[str, bytes]) -> int:
    return sum(member_size(len(data)) for data in parts.values())


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard: its sample count, size in bytes, sha256 (hex) and DALI index text."""

    samples: int
    bytes: int
    sha256: str
    index: str


class ShardWriter:
    """Append samples to a new tar at ``path``; ``close()`` ends it and returns its ShardInfo."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.offset = 0
        self._lines: list[str] = []

    @property
    def samples(self) -> int:
        return len(self._lines)

    def projected_size(self, parts: Mapping[str, bytes]) -> int:
        """The finished shard's size if ``parts`` were the last sample added."""
        return self.offset + sample_size(parts) + END_OF_ARCHIVE

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.offset += len(data)

    def add(self, key: str, parts: Mapping[str, bytes]) -> None:
        """Write one sample: a member ``<key>.<ext>`` for each item of ``parts``, in order."""
        if not _NAME_PART.match(key) or not parts:
            raise ValueError(f"bad sample key {key!r} (letters, digits, _ and -) or no parts")
        fields = []
        for ext, data in parts.items():
            if not _NAME_PART.match(ext):
                raise ValueError(f"bad extension {ext!r}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            fields.append(f"{ext} {self.offset} {len(data)} {info.name}")
            self._write(data)
            if len(data) % BLOCK:
                self._write(bytes(BLOCK - len(data) % BLOCK))
        self._lines.append(" ".join(fields))

    def close(self) -> ShardInfo:
        """End the archive, flush it to disk and return what the manifest needs."""
        self._write(bytes(END_OF_ARCHIVE))
        self._file.flush()
        _fsync(self._file)
        self._file.close()
        index = f"{INDEX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines)
        return ShardInfo(len(self._lines), self.offset, self._sha.hexdigest(), index)

    def discard(self) -> None:
        """Close and delete an unfinished shard."""
        try:
            self._file.close()
        except OSError:  # flushing what is buffered fails again when the disk is full
            pass
        self.path.unlink(missing_ok=True)


def _fsync(f) -> None:
    try:
        os.fsync(f.fileno())
    except OSError:  # some filesystems (e.g. certain FUSE mounts) do not support it
        pass
