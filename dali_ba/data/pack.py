"""``dali-ba data pack SRC OUT``: an image folder (or file list) → WebDataset shards + DALI indexes + manifest.

Reading 1.28 million small files is slow on network filesystems and object stores; a few hundred large
tar shards are read sequentially, and DALI's ``fn.readers.webdataset`` reads them locally or from
``s3://``. Layout of OUT (a folder or ``s3://bucket/prefix``)::

    OUT/train-000000.tar   samples <key>.jpg (image bytes) + <key>.cls (label as ASCII digits, as other
                           WebDataset readers expect) + <key>.lbl (the same label as a little-endian int32,
                           which DALI's reader hands out as a number)
    OUT/train-000000.idx   its DALI index (what DALI's wds2idx would write), so the reader never scans tars
    ...
    OUT/val-000000.tar ... (``--split val``: splits share OUT and its class list)
    OUT/dataset.json       the manifest (schema: dali_ba.data.manifest), written last

Keys are the sample's 9-digit position in its split (unique, sortable). Samples are written in a seeded
random order, so every shard mixes classes (DALI's shuffle is shard order plus a buffer of samples).

Every file goes through ``dali-ba data verify``'s checks (verify_files: readable, a DALI format, decodes with
DALI; without ``--max-side`` also the pixel limit). Files that fail are left out, each listed with its
reason on stdout and in the manifest (``splits.<split>.skipped``), then a warning line. The exit status
is 0 when the pack is complete — the shards hold every file that decodes, so the output is usable and a
rerun would not change it — and 1 only with ``--strict``. Errors a user can fix (missing SRC, OUT a file
or not writable, disk full, bad options, bucket missing, credentials refused, endpoint unreachable)
print one line and exit 2.

Interruption: a shard is visible only once complete (temporary name, then rename; on S3 an upload
completes or leaves nothing visible) and the manifest is written last, atomically, so a reader never sees
a half-written pack as complete. A rerun deletes what a killed run left (``.<split>-*.partial`` files,
unfinished multipart uploads) and rewrites the split from the start: shard bytes are deterministic
(same files, options and seed → same shards and checksums), and shards of an earlier, longer pack that
the new manifest does not list are deleted. Do not read a split while it is being repacked, and do not
pack two splits into one OUT at the same time (the last manifest write wins).
"""
from __future__ import annotations

import argparse
import io
import os
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dali_ba.errors import UserError
from dali_ba.provenance import git_commit

DEFAULT_SHARD_SIZE = "256MB"
EXTENSIONS = ("jpg", "cls", "lbl")  # per sample, in this order
DEFAULT_QUALITY = 90
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_size(text: str | int) -> int:
    """Bytes in ``256MB``, ``1GiB``, ``1.5G``, ``4096`` (k/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise UserError(f"--shard-size: expected a size like 256MB or 1GiB, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise UserError(f"--shard-size: must be at least 1 byte, got {text!r}")
    return size


@dataclass
class PackResult:
    """What one pack did: the manifest entry of the split and the files it left out (``BadFile``s)."""

    out: str
    split: str
    entry: dict[str, Any]
    skipped: list = field(default_factory=list)
    resized: int = 0
    not_resized: list = field(default_factory=list)  # paths PIL could not re-encode (kept as they are)
    total: int = 0
    seconds: float = 0.0


def _prepare(path: str, max_side: int | None, quality: int) -> tuple[bytes | None, str]:
    """(bytes to store, "kept" | "resized" | "not-resized" | reason it could not be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:  # removed or changed since it was checked
        return None, f"cannot read it: {exc.strerror or exc}"
    if not max_side:
        return data, "kept"
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) <= max_side:
                return data, "kept"
            im.thumbnail((max_side, max_side), Image.BICUBIC, reducing_gap=2.0)  # JPEG: DCT-scaled decode
            im = ImageOps.exif_transpose(im)  # DALI applies EXIF orientation; the new file has no EXIF
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            out = io.BytesIO()
            im.save(out, "JPEG", quality=quality)
            return out.getvalue(), "resized"
    except Exception:  # noqa: BLE001 - DALI decodes it (verified), PIL cannot: keep the original bytes
        return data, "not-resized"


def _check_options(split: str, quality: int, max_side: int | None, workers: int) -> None:
    if not _SPLIT_NAME.match(split):
        raise UserError(f"--split: letters, digits, '_' and '-' only, got {split!r}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality: expected 1..100, got {quality}")
    if max_side is not None and max_side < 1:
        raise UserError(f"--max-side: expected a positive number of pixels, got {max_side}")
    if workers < 1:
        raise UserError(f"--workers: expected >= 1, got {workers}")


def pack(src: str | Path, out: str, *, split: str = "train", file_list: str | Path | None = None,
         shard_size: int | str = DEFAULT_SHARD_SIZE, max_side: int | None = None, quality: int = DEFAULT_QUALITY,
         workers: int = 2, shuffle_seed: int = 0, max_pixels: int | None = None,
         progress: bool = True) -> PackResult:
    """Pack the images under ``src`` into shards of about ``shard_size`` bytes under ``out`` as ``split``."""
    from dali_ba import __version__
    from dali_ba.data import manifest as mf
    from dali_ba.data.pack_output import LocalOutput, open_output
    from dali_ba.data.verify import DEFAULT_MAX_PIXELS
    from dali_ba.dataset import check_dataset_paths, scan_image_folder

    started = time.perf_counter()
    shard_bytes = parse_size(shard_size)
    _check_options(split, quality, max_side, workers)
    if max_pixels is None:  # downscaled images need no pixel limit: they are small once packed
        max_pixels = 0 if max_side else DEFAULT_MAX_PIXELS
    check_dataset_paths(src, file_list)
    output = open_output(str(out), threads=workers)
    if isinstance(output, LocalOutput):
        src_abs, out_abs = Path(src).resolve(), Path(out).resolve()
        if out_abs == src_abs or src_abs in out_abs.parents:
            raise UserError(f"output {out} is inside the source folder {src}: choose an OUT outside it")
    output.prepare()
    try:
        dataset = scan_image_folder(src, file_list=file_list)
        where = f"{output.url}/{mf.MANIFEST_NAME}"
        label_map = mf.align_classes(mf.parse(output.read_manifest(), where), split, dataset.classes, where)
        output.clean(split)
        result = PackResult(output.url, split, {}, total=len(dataset))
        shards = _write_shards(output, dataset, label_map, split, shard_bytes, max_side, quality, workers,
                               shuffle_seed, max_pixels, progress, result)
        result.skipped.sort(key=lambda b: b.path)
        if not shards:
            first = result.skipped[0]
            raise UserError(f"{src}: none of the {len(dataset)} files can be packed "
                            f"(e.g. {first.path}: {first.reason})")
        result.entry = {
            "num_samples": sum(s["samples"] for s in shards),
            "extensions": list(EXTENSIONS),
            "shards": shards,
            "skipped": [{"path": os.path.relpath(b.path, dataset.root), "reason": b.reason} for b in result.skipped],
            "source": {"root": dataset.root, "file_list": str(Path(file_list).resolve()) if file_list else None},
            "options": {"shard_size": shard_bytes, "max_side": max_side, "quality": quality,
                        "shuffle_seed": shuffle_seed, "max_pixels": max_pixels},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dali_ba_version": __version__,
            "git_commit": git_commit()["git_commit"],
        }
        # Read the manifest again: a pack of another split into OUT may have finished meanwhile.
        latest = mf.parse(output.read_manifest(), where)
        mf.align_classes(latest, split, dataset.classes, where)
        output.write_manifest(mf.dumps(mf.with_split(latest, split, result.entry, dataset.classes)))
        output.remove_stale(split, {name for s in shards for name in (s["file"], s["index"])})
    finally:
        output.close()
    result.seconds = time.perf_counter() - started
    return result


def _write_shards(output, dataset, label_map: list[int], split: str, shard_bytes: int, max_side: int | None,
                  quality: int, workers: int, seed: int, max_pixels: int, progress: bool,
                  result: PackResult) -> list[dict[str, Any]]:
    """Check, read (and downscale) every file in a seeded random order and write the shards; their
    manifest entries. Files that fail are added to ``result.skipped``."""
    import numpy as np
    from tqdm import tqdm

    from dali_ba.data.manifest import shard_names
    from dali_ba.data.verify import BadFile, verify_files
    from dali_ba.data.webdataset import ShardWriter

    order = np.random.default_rng(seed).permutation(len(dataset))
    chunk = max(256, 64 * workers)
    shards: list[dict[str, Any]] = []
    writer: ShardWriter | None = None

    def finish(w: ShardWriter) -> None:
        tar_name, index_name = shard_names(split, len(shards))
        try:
            info = w.close()
        except OSError as exc:
            raise UserError(f"cannot write {output.url}/{tar_name}: {exc.strerror or exc}") from None
        output.commit(w.path, tar_name, info.index, index_name)
        shards.append({"file": tar_name, "index": index_name, "samples": info.samples, "bytes": info.bytes,
                       "sha256": info.sha256})

    position = 0
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="pack") as pool, \
                tqdm(total=len(dataset), desc=f"pack {split}", unit="img", disable=None if progress else True) as bar:
            for start in range(0, len(order), chunk):
                picked = order[start:start + chunk]
                paths = [dataset.files[i] for i in picked]
                report = verify_files(paths, num_threads=workers, progress=False, max_pixels=max_pixels)
                left_out = {b.path for b in report.bad + report.large}
                result.skipped.extend(report.bad + report.large)
                good = [i for i in picked if dataset.files[i] not in left_out]
                prepared = pool.map(lambda i: _prepare(dataset.files[i], max_side, quality), good)
                for i, (data, status) in zip(good, prepared):
                    if data is None:
                        result.skipped.append(BadFile(dataset.files[i], status))
                        continue
                    result.resized += status == "resized"
                    if status == "not-resized":
                        result.not_resized.append(dataset.files[i])
                    label = label_map[dataset.labels[i]]
                    parts = {"jpg": data, "cls": str(label).encode(), "lbl": struct.pack("<i", label)}
                    if writer is not None and writer.samples and writer.projected_size(parts) > shard_bytes:
                        finish(writer)
                        writer = None
                    if writer is None:
                        writer = ShardWriter(output.shard_path(shard_names(split, len(shards))[0]))
                    writer.add(f"{position:09d}", parts)
                    position += 1
                bar.update(len(picked))
        if writer is not None:
            finish(writer)
            writer = None
    except OSError as exc:  # disk full, quota, permissions while writing a shard
        path = writer.path if writer is not None else output.url
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.discard()
    return shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dali_ba.dataset import expand_path

    parser.add_argument("src", type=expand_path,
                        help="ImageFolder root (SRC/<class>/<image>) or the root of --file-list")
    parser.add_argument("out", type=expand_path,
                        help="output folder or s3://bucket/prefix (shards, indexes, dataset.json)")
    parser.add_argument("--file-list", default=None, type=expand_path,
                        help="pack the files of a 'relative/path label' list under SRC")
    parser.add_argument("--split", default="train",
                        help="split name, the shards' prefix (default: %(default)s); several splits share OUT")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                        help="target bytes per shard, e.g. 256MB, 1GiB (default: %(default)s); a shard exceeds it "
                             "only when one sample alone does")
    parser.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="downscale images whose longer side exceeds N pixels (aspect kept, EXIF orientation "
                             "applied) and re-encode them as JPEG at --quality; smaller images keep their bytes "
                             "(default: off, every image keeps its original bytes)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help="JPEG quality of re-encoded images (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2),
                        help="threads for reading, checking and re-encoding (default: %(default)s)")
    parser.add_argument("--shuffle-seed", type=int, default=0,
                        help="seed of the order in which samples are written (default: %(default)s). Samples are "
                             "shuffled so that every shard mixes classes: DALI's shuffle of packed data is the "
                             "shard order plus a buffer of samples, so shards sorted by class would feed long runs "
                             "of one label")
    parser.add_argument("--max-pixels", type=float, default=None, metavar="N",
                        help="leave out images with more pixels than this, as verify does (default: verify's "
                             "limit, or none with --max-side; 0 = no limit)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any file was left out (the pack is still written)")


def run(args: argparse.Namespace) -> int:
    if args.shuffle_seed < 0:
        raise UserError(f"--shuffle-seed: expected a value >= 0; got {args.shuffle_seed}")
    if args.max_pixels is not None and not args.max_pixels >= 0:  # also NaN
        raise UserError(f"--max-pixels: expected a value >= 0; got {args.max_pixels:g}")
    result = pack(args.src, args.out, split=args.split, file_list=args.file_list, shard_size=args.shard_size,
                  max_side=args.max_side, quality=args.quality, workers=args.workers,
                  shuffle_seed=args.shuffle_seed,
                  max_pixels=None if args.max_pixels is None else int(args.max_pixels))
    for bad in result.skipped:
        print(f"{bad.path}: {bad.reason}")
    entry = result.entry
    size = sum(s["bytes"] for s in entry["shards"])
    print(f"packed {entry['num_samples']} images into {len(entry['shards'])} shards ({size / 1e6:.1f} MB) "
          f"at {result.out} as split {result.split!r} in {result.seconds:.1f} s")
    if args.max_side:
        print(f"{result.resized} images downscaled to at most {args.max_side} px (JPEG quality {args.quality}); "
              f"the others keep their original bytes")
    if result.not_resized:
        print(f"{len(result.not_resized)} images larger than --max-side could not be re-encoded and keep their "
              f"bytes (e.g. {result.not_resized[0]})")
    if result.skipped:
        print(f"warning: {len(result.skipped)} of {result.total} files left out (listed above and under "
              f"splits.{result.split}.skipped in dataset.json); `dali-ba data verify` explains them")
        return 1 if args.strict else 0
    return 0
