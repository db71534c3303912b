"""Where ``dali-ba data pack`` writes: a local folder or an ``s3://`` prefix, behind one small interface.

Both make a shard visible only when it is complete and write the manifest last, in one piece:

- folder: a shard is written as ``.<name>.partial`` and renamed; the manifest goes through
  ``.dataset.json.partial`` and an atomic rename. ``clean`` deletes the ``.partial`` files a killed run
  left behind.
- ``s3://``: a shard is written to a local staging folder (``$TMPDIR/dali-ba-pack-<hash of OUT>``, emptied
  at the start) and uploaded (multipart above 64 MiB; an object appears only when its upload completes);
  ``clean`` aborts the multipart uploads a killed run left unfinished under the prefix.

After the new manifest is in place, ``remove_stale`` deletes the split's shards that it no longer lists
(an earlier pack that made more shards).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from dali_ba import storage
from dali_ba.data.manifest import MANIFEST_NAME
from dali_ba.errors import UserError

PARTIAL = ".partial"


def _shard_pattern(split: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(split)}-\d{{6}}\.(tar|idx)$")


def _os_error(exc: OSError, path: str | Path, doing: str) -> UserError:
    return UserError(f"cannot {doing} {path}: {exc.strerror or exc}")


class LocalOutput:
    """A local folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)

    def prepare(self) -> None:
        """Create the folder; UserError if it is a file or cannot be written."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output {self.root} exists and is not a folder")
        from dali_ba.outputs import probe_write

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, self.root, "write to") from None
        probe_write(self.root, f"output {self.root}")  # a real write: a full disk fails here, before any work

    def clean(self, split: str) -> int:
        """Delete what an interrupted run left (``.<split>-*.partial``, a partial manifest); their number."""
        names = [p for p in self.root.iterdir() if p.name.endswith(PARTIAL) and
                 (p.name.startswith(f".{split}-") or p.name == f".{MANIFEST_NAME}{PARTIAL}")]
        for path in names:
            try:
                path.unlink()
            except OSError as exc:
                raise _os_error(exc, path, "delete") from None
        return len(names)

    def shard_path(self, name: str) -> Path:
        """Where to write shard ``name`` before ``commit``."""
        return self.root / f".{name}{PARTIAL}"

    def commit(self, written: Path, name: str, index_text: str, index_name: str) -> None:
        """Make a finished shard and its index visible under their final names."""
        index_tmp = self.shard_path(index_name)
        try:
            index_tmp.write_text(index_text)
            os.replace(index_tmp, self.root / index_name)
            os.replace(written, self.root / name)
        except OSError as exc:
            raise _os_error(exc, self.root / name, "write") from None

    def read_manifest(self) -> bytes | None:
        return storage.read_bytes(self.root / MANIFEST_NAME)

    def write_manifest(self, data: bytes) -> None:
        final = self.root / MANIFEST_NAME
        tmp = self.root / f".{MANIFEST_NAME}{PARTIAL}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            raise _os_error(exc, final, "write") from None

    def remove_stale(self, split: str, keep: set[str]) -> list[str]:
        pattern = _shard_pattern(split)
        stale = sorted(p for p in self.root.iterdir() if pattern.match(p.name) and p.name not in keep)
        for path in stale:
            try:
                path.unlink()
            except OSError as exc:
                raise _os_error(exc, path, "delete") from None
        return [p.name for p in stale]

    def close(self) -> None:
        pass


class S3Output:
    """An ``s3://bucket/prefix``; shards are staged in a local temporary folder."""

    def __init__(self, url: str, threads: int = 4):
        self.target = storage.parse_s3_url(url)
        self.url = str(self.target).rstrip("/")
        self.threads = threads
        self._bucket: storage.Bucket | None = None
        self._tmp: str | None = None

    @property
    def bucket(self) -> storage.Bucket:
        if self._bucket is None:
            self._bucket = storage.Bucket(self.target.bucket)
        return self._bucket

    def _key(self, name: str) -> str:
        return self.target.join(name).key

    def prepare(self) -> None:
        """UserError (missing bucket, credentials, endpoint) before any work is done."""
        self.bucket.check()
        # One staging folder per OUT: a rerun replaces what a killed run left there.
        tmp = Path(tempfile.gettempdir()) / f"dali-ba-pack-{hashlib.sha1(self.url.encode()).hexdigest()[:16]}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise _os_error(exc, tmp, "create the staging folder") from None
        self._tmp = str(tmp)

    def clean(self, split: str) -> int:
        return self.bucket.abort_uploads(self._key(f"{split}-"))

    def shard_path(self, name: str) -> Path:
        assert self._tmp is not None, "prepare() first"
        return Path(self._tmp) / name

    def commit(self, written: Path, name: str, index_text: str, index_name: str) -> None:
        self.bucket.upload(written, self._key(name), self.threads)
        self.bucket.put(self._key(index_name), index_text.encode())
        written.unlink(missing_ok=True)

    def read_manifest(self) -> bytes | None:
        return self.bucket.read(self._key(MANIFEST_NAME))

    def write_manifest(self, data: bytes) -> None:
        self.bucket.put(self._key(MANIFEST_NAME), data)

    def remove_stale(self, split: str, keep: set[str]) -> list[str]:
        pattern = _shard_pattern(split)
        prefix = self._key(f"{split}-")
        base = prefix[: len(prefix) - len(f"{split}-")]
        stale = sorted(k for k in self.bucket.list(prefix)
                       if pattern.match(k[len(base):]) and k[len(base):] not in keep)
        if stale:
            self.bucket.delete(stale)
        return [k[len(base):] for k in stale]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def open_output(out: str, threads: int = 4) -> LocalOutput | S3Output:
    """The output for ``out``: ``s3://…`` or a local folder (UserError for other schemes)."""
    if storage.is_url(out):
        return S3Output(out, threads)  # parse_s3_url rejects gs:// and others with one line
    return LocalOutput(out)
