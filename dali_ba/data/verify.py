"""``dali-ba data verify``: find every file DALI cannot decode, each with a reason.

Cheap checks first (missing, a directory, unreadable, 0 bytes, not an image format DALI decodes;
with a pixel limit, the header's size), by a pool of reader threads one batch ahead of the decoder,
then a real DALI CPU decode (DALI's own threads) in batches. DALI's decode errors do not name the
file (``nvImageCodec failure: '#4'``) and leave the pipeline dead, so a failed batch is split in
halves on a fresh one-thread pipeline until the culprits are single files. Good batches cost one
decode; each bad file costs about log2(batch) extra runs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dali_ba.errors import UserError
from dali_ba.pipeline import abandon_pipeline

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


@contextlib.contextmanager
def _native_stderr_captured():
    """Yield a list that receives what C++ code wrote to file descriptor 2 meanwhile.

    DALI's codecs log every failed decode there (``[ERROR] [libjpeg_turbo_decoder] ... Premature end
    of JPEG data``): while we bisect, those lines are expected noise, and the last one is often a
    better reason than DALI's exception ("Failed to decode sample").
    """
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _codec_message(native_log: str) -> str | None:
    """The last codec error line of ``native_log``, without colour codes and logger tags."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in native_log.splitlines() if "[ERROR]" in line]
    if not lines:
        return None
    return re.sub(r"^(\s*\[[^\]]*\]\s*)+", "", lines[-1]).strip() or None


def _dali_reason(exc: Exception, data: np.ndarray, native_log: str = "") -> str:
    """The meaningful line of a DALI error (the first lines are 'Critical error in pipeline')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    lines = [line for line in lines if not line.startswith(("Current pipeline object",
                                                            "Critical error in pipeline"))]
    msg = lines[0] if lines else type(exc).__name__
    # The sample index refers to the one-file batch we decoded: noise for the user.
    msg = re.sub(r"\s*sample #\d+\s*:?\s*$", " sample", msg).rstrip(" :")
    codec = _codec_message(native_log)
    if codec:
        msg = f"{msg}: {codec}"
    kind = _sniff(data[:16].tobytes())
    hint = f" (looks like {kind}: corrupt or truncated)" if kind else \
        " (content is not a known image format)"
    return f"DALI decode failed: {msg}{hint}"


class _Decoder:
    """A DALI CPU decode pipeline fed raw bytes, rebuilt after any error (DALI's are fatal)."""

    def __init__(self, batch_size: int, num_threads: int):
        self.batch_size, self.num_threads = batch_size, num_threads
        self._pipe = None
        self._bisector: _Decoder | None = None
        self.native_log = ""

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
        """Decode one batch (<= batch_size samples); raises DALI's error if any sample fails (what
        DALI's codecs logged meanwhile is kept in ``native_log``, not shown)."""
        if self._pipe is None:
            self._pipe = self._build()
        captured: list[str] = []
        try:
            with _native_stderr_captured() as captured:
                self._pipe.feed_input("encoded", samples)
                self._pipe.run()
        except Exception:
            # Dead after any error ("pipeline object is no longer valid"); destroying it can crash.
            abandon_pipeline(self._pipe)
            self._pipe = None
            raise
        finally:
            self.native_log = "".join(captured)

    def find_bad(self, items: list[tuple[str, np.ndarray]]) -> list[BadFile]:
        """Decode ``items``; on failure bisect down to the failing files."""
        try:
            self.decode([data for _, data in items])
            return []
        except Exception as exc:  # DALI raises RuntimeError; anything else is also a failure
            if len(items) == 1:
                return [BadFile(items[0][0], _dali_reason(exc, items[0][1], self.native_log))]
        if self._bisector is None:
            # One thread: every failed pipeline is kept (see abandon_pipeline), and so its threads.
            self._bisector = self if self.num_threads == 1 else _Decoder(self.batch_size, num_threads=1)
        mid = len(items) // 2
        # If both halves decode the batch failed for no single file's sake: nothing to name.
        return self._bisector.find_bad(items[:mid]) + self._bisector.find_bad(items[mid:])


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
    then decode it with DALI (``num_threads`` DALI threads). With ``max_pixels`` > 0 a file whose
    header says it has more pixels is reported as large and not decoded."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if batch_size < 1 or num_threads < 1:
        raise UserError(f"batch_size and num_threads must be >= 1, got {batch_size}, {num_threads}")
    paths = [str(p) for p in paths]

    def read(path: str):
        reason, data = _cheap_check(path)
        size = image_pixels(data) if data is not None and max_pixels > 0 else None
        return path, reason, data, size

    decoder = _Decoder(batch_size, num_threads)
    bad: list[BadFile] = []
    large: list[BadFile] = []
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(num_threads, thread_name_prefix="verify-read") as pool, \
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
                bad.extend(decoder.find_bad(pending))
            bar.update(len(results))
    order = {p: i for i, p in enumerate(paths)}
    return VerifyReport(sorted(bad, key=lambda b: order[b.path]), sorted(large, key=lambda b: order[b.path]))


def find_undecodable(paths: Sequence[str], num_threads: int = 2, batch_size: int = 64,
                     progress: bool = True) -> list[BadFile]:
    """Return only the files DALI cannot decode (in input order), each with a reason."""
    return verify_files(paths, num_threads, batch_size, progress).bad


def decode_check_one(path: str) -> str | None:
    """Why DALI cannot decode ``path``, or None if it decodes."""
    bad = find_undecodable([str(path)], num_threads=1, batch_size=1, progress=False)
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
    parser.add_argument("--max-pixels", type=float, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="report images with more pixels than this as too large and leave them out of "
                             "the clean list, without decoding them (default: %(default).0f; 0 = no limit)")


def run(args: argparse.Namespace) -> int:
    from dali_ba.dataset import ignored_entries, scan_image_folder

    if args.max_pixels < 0:
        raise UserError(f"--max-pixels: expected a value >= 0; got {args.max_pixels:g}")
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
    if args.write_clean_list:
        left_out = {b.path for b in report.bad + report.large}
        out = Path(args.write_clean_list)
        lines = [f"{os.path.relpath(path, dataset.root)} {int(label)}"
                 for path, label in zip(dataset.files, dataset.labels) if path not in left_out]
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, out)  # a reader never sees a half-written list
        except OSError as exc:
            raise UserError(f"cannot write the clean list {out}: {exc.strerror or exc}") from exc
        print(f"wrote {len(lines)} usable files to {out} "
              f"(use it as a file list with root {dataset.root})")
    return 1 if report.bad or report.large or empty else 0
