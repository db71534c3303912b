"""``dali-ba data verify``: find every file DALI cannot decode, each with a reason.

Cheap checks first (missing, a directory, unreadable, 0 bytes), then a real DALI CPU decode in
batches. DALI's decode errors do not name the file (``nvImageCodec failure: '#4'``) and leave the
pipeline dead, so a failed batch is split in halves on a fresh pipeline until the culprits are
single files. Good batches cost one decode; each bad file costs about log2(batch) extra runs.
"""
from __future__ import annotations

import argparse
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dali_ba.errors import UserError

# Leading bytes of the formats DALI decodes; used only to make a failure's reason clearer.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"BM": "BMP",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
               b"\xffO\xffQ": "JPEG 2000", b"GIF8": "GIF"}


@dataclass(frozen=True)
class BadFile:
    """A file DALI cannot decode and why (DALI's own message where it had one)."""

    path: str
    reason: str


def _sniff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456":
        return "PNM"
    return next((name for sig, name in _SIGNATURES.items() if head.startswith(sig)), None)


def _cheap_check(path: str) -> tuple[str | None, np.ndarray | None]:
    """(reason, None) for a file that cannot even be read; (None, bytes) otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist", None
    except OSError as exc:
        return f"cannot stat it: {exc.strerror or exc}", None
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not an image file", None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", None
    if st.st_size == 0:
        return "empty file (0 bytes)", None
    try:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except PermissionError:
        return "cannot read it: permission denied", None
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}", None
    if data.size == 0:  # e.g. a file truncated between stat and read
        return "empty file (0 bytes)", None
    return None, data


def _dali_reason(exc: Exception, data: np.ndarray) -> str:
    """The meaningful line of a DALI error (the first lines are 'Critical error in pipeline')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    lines = [line for line in lines if not line.startswith(("Current pipeline object",
                                                            "Critical error in pipeline"))]
    msg = lines[0] if lines else type(exc).__name__
    # The sample index refers to the one-file batch we decoded: noise for the user.
    msg = re.sub(r"\s*sample #\d+\s*:?\s*$", " sample", msg).rstrip(" :")
    kind = _sniff(data[:16].tobytes())
    hint = f" (looks like {kind}: corrupt or truncated)" if kind else \
        " (content is not a known image format)"
    return f"DALI decode failed: {msg}{hint}"


class _Decoder:
    """A DALI CPU decode pipeline fed raw bytes, rebuilt after any error (DALI's are fatal)."""

    def __init__(self, batch_size: int, num_threads: int):
        self.batch_size, self.num_threads = batch_size, num_threads
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def decode_pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        pipe = decode_pipe()
        pipe.build()
        return pipe

    def decode(self, samples: list[np.ndarray]) -> None:
        """Decode one batch (<= batch_size samples); raises DALI's error if any sample fails."""
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", samples)
            self._pipe.run()
        except Exception:
            self._pipe = None  # dead after any error: "pipeline object is no longer valid"
            raise

    def find_bad(self, items: list[tuple[str, np.ndarray]]) -> list[BadFile]:
        """Decode ``items``; on failure bisect on fresh pipelines down to the failing files."""
        try:
            self.decode([data for _, data in items])
            return []
        except Exception as exc:  # DALI raises RuntimeError; anything else is also a failure
            if len(items) == 1:
                return [BadFile(items[0][0], _dali_reason(exc, items[0][1]))]
        mid = len(items) // 2
        # If both halves decode the batch failed for no single file's sake: nothing to name.
        return self.find_bad(items[:mid]) + self.find_bad(items[mid:])


def find_undecodable(paths: Sequence[str], num_threads: int = 2, batch_size: int = 64,
                     progress: bool = True) -> list[BadFile]:
    """Return only the files DALI cannot decode (in input order), each with a reason."""
    from tqdm import tqdm

    if batch_size < 1 or num_threads < 1:
        raise UserError(f"batch_size and num_threads must be >= 1, got {batch_size}, {num_threads}")
    decoder = _Decoder(batch_size, num_threads)
    bad: list[BadFile] = []
    pending: list[tuple[str, np.ndarray]] = []
    with tqdm(total=len(paths), desc="verify", unit="img",
              disable=None if progress else True) as bar:
        for i, path in enumerate(paths):
            path = str(path)
            reason, data = _cheap_check(path)
            if reason is not None:
                bad.append(BadFile(path, reason))
            else:
                pending.append((path, data))
            if len(pending) == batch_size or (i == len(paths) - 1 and pending):
                bad.extend(decoder.find_bad(pending))
                bar.update(len(pending))
                pending = []
            if reason is not None:
                bar.update()
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(bad, key=lambda b: order[b.path])


_single: _Decoder | None = None


def decode_check_one(path: str) -> str | None:
    """Why DALI cannot decode ``path``, or None if it decodes (for naming a loader's culprit)."""
    global _single
    reason, data = _cheap_check(str(path))
    if reason is not None:
        return reason
    if _single is None:  # reused across calls: a loader may check a whole batch one by one
        _single = _Decoder(batch_size=1, num_threads=1)
    bad = _single.find_bad([(str(path), data)])
    return bad[0].reason if bad else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="ImageFolder root (ROOT/<class>/<image>) or file-list root")
    parser.add_argument("--file-list", default=None,
                        help="check the files of a 'relative/path label' list (relative to ROOT)")
    parser.add_argument("--write-clean-list", default=None, metavar="OUT.txt",
                        help="write the decodable files as a 'relative/path label' file list")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="DALI decode threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="files per DALI batch")


def run(args: argparse.Namespace) -> int:
    from dali_ba.dataset import scan_image_folder

    dataset = scan_image_folder(args.root, file_list=args.file_list)
    bad = find_undecodable(dataset.files, num_threads=args.threads, batch_size=args.batch_size)
    for item in bad:
        print(f"{item.path}: {item.reason}")
    total = len(dataset.files)
    if bad:
        print(f"{len(bad)} of {total} files cannot be decoded by DALI "
              f"(remove them, or train from a clean list: --write-clean-list)")
    else:
        print(f"all {total} files under {args.root} decode with DALI")
    if args.write_clean_list:
        bad_paths = {b.path for b in bad}
        out = Path(args.write_clean_list)
        lines = [f"{os.path.relpath(path, dataset.root)} {int(label)}"
                 for path, label in zip(dataset.files, dataset.labels) if path not in bad_paths]
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, out)  # a reader never sees a half-written list
        except OSError as exc:
            raise UserError(f"cannot write the clean list {out}: {exc.strerror or exc}") from exc
        print(f"wrote {len(lines)} decodable files to {out} "
              f"(use it as a file list with root {dataset.root})")
    return 1 if bad else 0
