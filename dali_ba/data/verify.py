"""``dali-ba data verify``: find every file DALI cannot decode, each with a reason.

Cheap checks first (missing, a directory, unreadable, 0 bytes, not an image format DALI decodes;
with a pixel limit, the header's size), by a pool of reader threads one batch ahead of the decoder,
then a real DALI CPU decode (DALI's own threads) in batches, in a child process
(``decode_worker``): DALI can crash on corrupt data and a failed DALI pipeline cannot be freed, so
that process may die or grow, and is replaced. DALI's decode errors do not name the file
(``nvImageCodec failure: '#4'``), so the files of a failed batch are decoded again one at a time.
Good batches cost one decode; a failed batch costs one more decode per file.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dali_ba.data.decode_worker import DecodeWorker, Failure
from dali_ba.errors import DecodeError, UserError

# 100 MP (10000x10000): in the loader ~1.5 GB and a few seconds of one core per such image.
DEFAULT_MAX_PIXELS = 100_000_000
_PIL_LIMIT_LOCK = threading.Lock()  # image_pixels lifts PIL's own limit for one header read

# Leading bytes of image formats. Files that are none of DALI's formats never reach DALI: its CPU
# decoder, given content it does not recognise (text, random bytes) in a batch of 64, fails with
# nvImageCodec '#4' but now and then (within 20 to 150 such batches here) crashes the process with
# a segmentation fault in a DALI thread instead (DALI 2.4, CPU); recognised but broken files
# (500 batches with a truncated JPEG) and one-file batches (2,000 runs) fail cleanly.
DALI_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "JPEG 2000", "WebP", "PNM")
NOT_DECODED_BY_DALI = ("GIF",)
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
    kind = _sniff(data[:16].tobytes())
    if kind is None:
        return f"DALI cannot decode it: content is not a known image format (starts with {data[:12].tobytes()!r})", None
    if kind in NOT_DECODED_BY_DALI:
        return f"DALI cannot decode it: a {kind} image (DALI decodes {', '.join(DALI_FORMATS)})", None
    return None, data


def _dali_reason(failure: Failure, data: np.ndarray) -> str:
    """The reason shown for a file that failed alone: DALI's message (or how the decode process
    ended) and what the file looks like."""
    if failure.kind == "timeout":  # nothing says the file is broken: maybe just huge, or DALI hung
        return failure.message
    kind = _sniff(data[:16].tobytes())
    hint = f" (looks like {kind}: corrupt or truncated)" if kind else " (content is not a known image format)"
    return f"{'DALI decode failed: ' if failure.kind == 'error' else ''}{failure.message}{hint}"


def _find_bad(worker: DecodeWorker, items: list[tuple[str, np.ndarray]], batch_size: int,
              num_threads: int) -> list[BadFile]:
    """Decode ``items`` as one batch; if that fails, decode each file alone to name the failing ones
    (DALI's batch error does not say which, and one file per failed pipeline bounds the leak)."""
    if len(items) > 1 and worker.decode([data for _, data in items], batch_size, num_threads) is None:
        return []
    bad = []
    for path, data in items:
        failure = worker.decode([data], 1, 1)
        if failure is not None and failure.kind == "crash":  # DALI's bad luck or a kill from outside: once more
            failure = worker.decode([data], 1, 1)
        if failure is not None:
            bad.append(BadFile(path, _dali_reason(failure, data)))
    # If the batch failed but every file decodes alone, there is nothing to name.
    return bad


@dataclass(frozen=True)
class VerifyReport:
    """``bad``: files DALI cannot decode (or read); ``large``: files over the pixel limit (not
    decoded: each would cost about 10 bytes and 75 ns of one core per pixel in the loader)."""

    bad: list
    large: list


def image_pixels(data: np.ndarray) -> tuple[int, str] | None:
    """(pixel count, "WxH") from the file's header (PIL reads only the header), or None when PIL
    does not know the format or the header is broken (DALI's decode then decides)."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we judge the size ourselves
            with Image.open(io.BytesIO(data.tobytes())) as im:
                w, h = im.size
                return w * h, f"{w}x{h}"
    except Image.DecompressionBombError:  # above PIL's own limit: read the header without it
        with _PIL_LIMIT_LOCK:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(io.BytesIO(data.tobytes())) as im:
                    w, h = im.size
                    return w * h, f"{w}x{h}"
            except Exception:  # noqa: BLE001
                return None
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except Exception:  # noqa: BLE001 - not readable by PIL: no size, DALI decides
        return None


def verify_files(paths: Sequence[str], num_threads: int = 2, batch_size: int = 64, progress: bool = True,
                 max_pixels: int = 0) -> VerifyReport:
    """Check every file: read it (``num_threads`` reader threads, a batch ahead of the decoder),
    then decode it with DALI (``num_threads`` DALI threads) in a child process, never in this one.
    With ``max_pixels`` > 0 a file whose header says it has more pixels is reported as large and
    not decoded."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if batch_size < 1 or num_threads < 1:
        raise UserError(f"batch_size and num_threads must be >= 1, got {batch_size}, {num_threads}")
    paths = [str(p) for p in paths]

    def read(path: str):
        reason, data = _cheap_check(path)
        size = image_pixels(data) if data is not None and max_pixels > 0 else None
        return path, reason, data, size

    worker: DecodeWorker | None = None  # started at the first file that needs DALI
    bad: list[BadFile] = []
    large: list[BadFile] = []
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with contextlib.ExitStack() as stack, \
            ThreadPoolExecutor(num_threads, thread_name_prefix="verify-read") as pool, \
            tqdm(total=len(paths), desc="verify", unit="img", disable=None if progress else True) as bar:
        ahead = [pool.submit(read, p) for p in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            results = [f.result() for f in ahead]
            ahead = [pool.submit(read, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            pending = []
            for path, reason, data, size in results:
                if reason is not None:
                    bad.append(BadFile(path, reason))
                elif size is not None and size[0] > max_pixels:
                    large.append(BadFile(path, f"too large to train on: {size[1]} = {size[0] / 1e6:.1f} MP > "
                                               f"{max_pixels / 1e6:g} MP (--max-pixels; 0 = no limit); not decoded"))
                else:
                    pending.append((path, data))
            if pending:
                if worker is None:
                    worker = stack.enter_context(DecodeWorker())
                bad.extend(_find_bad(worker, pending, batch_size, num_threads))
            bar.update(len(results))
    order = {p: i for i, p in enumerate(paths)}
    return VerifyReport(sorted(bad, key=lambda b: order[b.path]), sorted(large, key=lambda b: order[b.path]))


def find_undecodable(paths: Sequence[str], num_threads: int = 2, batch_size: int = 64,
                     progress: bool = True) -> list[BadFile]:
    """Return only the files DALI cannot decode (in input order), each with a reason."""
    return verify_files(paths, num_threads, batch_size, progress).bad


def explain_failure(root: str, packed: bool, dali_line: str, candidates: Sequence[str]) -> DecodeError:
    """A loader's DALI failure as one line: DALI rarely names the file, so decode the files that
    may be at fault (``candidates``, those of the batches in flight) again, one by one."""
    if packed or "://" in root:
        what = "the packed dataset" if packed else "objects under"
        return DecodeError(f"DALI failed while reading {what} {root} ({dali_line}); check that the storage is "
                           f"reachable and the shards match dataset.json's sha256, or pack again")
    bad = [(b.path, b.reason) for b in find_undecodable(candidates, num_threads=1, progress=False)]
    hint = f"run `dali-ba data verify {root}` to list every such file (and write a clean file list)"
    if bad:
        named = "; ".join(f"{p} ({r})" for p, r in bad[:10])
        return DecodeError(f"cannot decode {named}; {hint}", bad_files=[p for p, _ in bad])
    return DecodeError(f"DALI failed while loading ({dali_line}); none of the {len(candidates)} files of the "
                       f"batches in flight failed a decode on their own; {hint}")


def decode_check_one(path: str) -> str | None:
    """Why DALI cannot decode ``path``, or None if it decodes."""
    bad = find_undecodable([str(path)], num_threads=1, batch_size=1, progress=False)
    return bad[0].reason if bad else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dali_ba.dataset import expand_path

    parser.add_argument("root", type=expand_path, help="ImageFolder root (ROOT/<class>/<image>) or file-list root")
    parser.add_argument("--file-list", default=None, type=expand_path,
                        help="check the files of a 'relative/path label' list (relative to ROOT)")
    parser.add_argument("--write-clean-list", default=None, metavar="OUT.txt", type=expand_path,
                        help="write the decodable files as a 'relative/path label' file list")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="DALI decode threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="files per DALI batch")
    parser.add_argument("--max-pixels", type=float, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="report images with more pixels than this as too large and leave them out of "
                             "the clean list, without decoding them (default: %(default).0f; 0 = no limit)")


def run(args: argparse.Namespace) -> int:
    from dali_ba.dataset import DatasetError, ignored_entries, list_line, scan_image_folder, write_file_list
    from dali_ba.outputs import check_output_file

    if not args.max_pixels >= 0:  # also NaN
        raise UserError(f"--max-pixels: expected a value >= 0; got {args.max_pixels:g}")
    if args.threads < 1 or args.batch_size < 1:
        raise UserError(f"--threads and --batch-size: expected values >= 1; got {args.threads} and {args.batch_size}")
    clean_list = check_output_file(args.write_clean_list, "--write-clean-list")  # before hours of decoding
    dataset = scan_image_folder(args.root, file_list=args.file_list, allow_empty_classes=True)
    report = verify_files(dataset.files, num_threads=args.threads, batch_size=args.batch_size,
                          max_pixels=int(args.max_pixels))
    for item in report.bad + report.large:
        print(f"{item.path}: {item.reason}")
    empty = []
    if args.file_list is None:  # a folder scan: class folders that hold no image
        counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
        empty = [str(Path(dataset.root, c)) for c, n in zip(dataset.classes, counts) if n == 0]
        for folder in empty:
            print(f"{folder}: class folder with no images (training refuses it: add images or remove the "
                  f"folder; a clean list keeps its label)")
    total = len(dataset.files)
    if report.bad:
        print(f"{len(report.bad)} of {total} files cannot be decoded by DALI "
              f"(remove them, or train from a clean list: --write-clean-list)")
    if report.large:
        print(f"{len(report.large)} of {total} files have more than {args.max_pixels:.0f} pixels "
              f"(left out of the clean list; --max-pixels 0 keeps them)")
    if not report.bad and not report.large:
        print(f"all {total} files under {args.root} decode with DALI")
    if args.file_list is None:
        ignored = ignored_entries(dataset.root)
        if ignored:
            shown = ", ".join(os.path.relpath(p, dataset.root) for p in ignored[:3])
            print(f"ignored {len(ignored)} hidden or non-image entries, as the loader does (e.g. {shown})")
    unwritable = []
    if clean_list is not None:
        left_out = {b.path for b in report.bad + report.large}
        lines = []
        for path, label in zip(dataset.files, dataset.labels):
            if path in left_out:
                continue
            try:
                lines.append(list_line(os.path.relpath(path, dataset.root), int(label)))
            except DatasetError as exc:
                unwritable.append(path)
                print(f"{path!r}: left out of the clean list: {exc} (rename the file)")
        try:
            clean_list.parent.mkdir(parents=True, exist_ok=True)
            write_file_list(clean_list, lines)
        except OSError as exc:
            raise UserError(f"cannot write the clean list {clean_list}: {exc.strerror or exc}") from exc
        print(f"wrote {len(lines)} usable files to {clean_list} "
              f"(use it as a file list with root {dataset.root})")
    return 1 if report.bad or report.large or empty or unwritable else 0
