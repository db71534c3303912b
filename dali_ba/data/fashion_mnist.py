"""``dali-ba data fashion-mnist``: the real Fashion-MNIST images as JPEG ImageFolder trees.

Source: the Debian package ``dataset-fashion-mnist`` (idx files under
``/usr/share/datasets/fashion-mnist``). Looked up in ``--source``, the system path, then a cache
(``$DALI_BA_CACHE`` or ``~/.cache/dali-ba``)/fashion-mnist; if missing, fetched with
``apt-get download`` + ``dpkg-deb -x`` (no root needed unless the package lists must be updated).
Output: ``OUT/train/<label>_<name>/<index:05d>.jpg`` (60,000) and ``OUT/val/...`` (10,000),
grayscale JPEG q95, written to a temporary folder and renamed into place with ``OUT/.complete``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np

from dali_ba.errors import DatasetError, UserError

# Official label names, made filesystem-safe; the numeric prefix keeps sorted order == label order
# (ImageFolder assigns labels by sorted folder name).
CLASSES = ["0_T-shirt_top", "1_Trouser", "2_Pullover", "3_Dress", "4_Coat",
           "5_Sandal", "6_Shirt", "7_Sneaker", "8_Bag", "9_Ankle_boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_DEB_DIR = "usr/share/datasets/fashion-mnist"  # inside the package
SYSTEM_DIR = Path("/") / _DEB_DIR
PACKAGE = "dataset-fashion-mnist"
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_MARKER = ".complete"


def cache_dir() -> Path:
    """Where downloaded idx files are kept: ``$DALI_BA_CACHE/fashion-mnist`` or ``~/.cache/...``."""
    root = os.environ.get("DALI_BA_CACHE") or Path.home() / ".cache" / "dali-ba"
    return Path(root) / "fashion-mnist"


def _has_all(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def find_source(source: str | os.PathLike | None = None, download: bool = True) -> Path | None:
    """The folder holding the four idx files; with ``source`` given only that one is accepted."""
    if source is not None:
        folder = Path(source)
        if not _has_all(folder):
            missing = [n for p in FILES.values() for n in p if not (folder / n).is_file()]
            raise DatasetError(f"--source {folder} lacks {', '.join(missing)}")
        return folder
    for folder in (SYSTEM_DIR, cache_dir()):
        if _has_all(folder):
            return folder
    return _download_to_cache() if download else None


def _apt(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True)


def _download_to_cache() -> Path:
    """``apt-get download`` the package into a temp dir, extract it, copy the idx files to cache."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError(f"Fashion-MNIST idx files not found in {SYSTEM_DIR} or {cache_dir()}, and "
                        f"apt-get/dpkg-deb are not available to fetch the Debian package {PACKAGE}; "
                        "pass --source DIR, or use `dali-ba data synth` for synthetic data")
    print(f"fetching the Debian package {PACKAGE} with apt-get download ...")
    with tempfile.TemporaryDirectory(prefix="dali-ba-fm-") as tmp:
        got = _apt(["apt-get", "download", PACKAGE], tmp)
        if got.returncode != 0:
            # Usually the package lists are missing (fresh container): update once and retry.
            print(f"apt-get download failed ({_last_line(got.stderr)}); running apt-get update ...")
            upd = _apt(["apt-get", "update"], tmp)
            if upd.returncode != 0:
                raise UserError(f"could not fetch {PACKAGE}: apt-get update failed "
                                f"({_last_line(upd.stderr)}); pass --source DIR, or use "
                                "`dali-ba data synth` for synthetic data")
            got = _apt(["apt-get", "download", PACKAGE], tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise UserError(f"could not fetch {PACKAGE} with apt-get download "
                            f"({_last_line(got.stderr)}); pass --source DIR, or use "
                            "`dali-ba data synth` for synthetic data")
        extract = Path(tmp) / "x"
        ex = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extract)],
                            capture_output=True, text=True)
        found = extract / _DEB_DIR
        if ex.returncode != 0 or not _has_all(found):
            raise UserError(f"{debs[0].name} did not contain the idx files under /{_DEB_DIR} "
                            f"({_last_line(ex.stderr)})")
        target = cache_dir()
        target.mkdir(parents=True, exist_ok=True)
        for pair in FILES.values():
            for name in pair:
                shutil.copyfile(found / name, target / (name + ".part"))
                os.replace(target / (name + ".part"), target / name)  # never a half file
    print(f"cached the idx files in {target}")
    return target


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: not a readable gzip file ({exc})") from exc


def read_idx(path: str | os.PathLike, expect_magic: int) -> np.ndarray:
    """Parse a gzipped idx file (big-endian header) into a uint8 array; errors name the file."""
    path = Path(path)
    data = _read_gz(path)
    if len(data) < 8:
        raise DatasetError(f"{path}: too short for an idx header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expect_magic:
        raise DatasetError(f"{path}: bad idx magic number {magic:#010x}, expected "
                           f"{expect_magic:#010x} ({'images' if expect_magic == 2051 else 'labels'})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated idx header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DatasetError(f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes "
                           f"of data, file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_split(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    img_name, lbl_name = FILES[split]
    images = read_idx(folder / img_name, _IMAGES_MAGIC)
    labels = read_idx(folder / lbl_name, _LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(f"{folder / img_name} has {len(images)} images but "
                           f"{folder / lbl_name} has {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise DatasetError(f"{folder / lbl_name}: label {int(labels.max())} out of range 0..9")
    n = len(images) if limit is None else min(limit, len(images))
    return images[:n], labels[:n]


def _label_count(path: Path) -> int | None:
    """Number of labels from the idx header alone (a cheap read, for the idempotence check)."""
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(8)
        return int.from_bytes(head[4:8], "big") if len(head) == 8 else None
    except (OSError, EOFError, zlib.error):
        return None


def _write_chunk(task: tuple[str, int, np.ndarray, np.ndarray]) -> int:
    from PIL import Image

    split_dir, start, images, labels = task
    for i, (img, label) in enumerate(zip(images, labels)):
        path = os.path.join(split_dir, CLASSES[label], f"{start + i:05d}.jpg")
        Image.fromarray(img).save(path, quality=95)
    return len(images)


def _write_split(split_dir: Path, images: np.ndarray, labels: np.ndarray, bar) -> None:
    import multiprocessing as mp

    for name in CLASSES:
        (split_dir / name).mkdir(parents=True, exist_ok=True)
    step = 2000
    tasks = [(str(split_dir), s, images[s:s + step], labels[s:s + step])
             for s in range(0, len(images), step)]
    workers = min(os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        for task in tasks:
            bar.update(_write_chunk(task))
        return
    # PIL's encoder holds the GIL for tiny images, so processes (not threads) give the speed-up.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        for done in pool.imap_unordered(_write_chunk, tasks):
            bar.update(done)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def prepare_fashion_mnist(out: str | os.PathLike, source: str | os.PathLike | None = None,
                          limit_train: int | None = None, limit_val: int | None = None,
                          progress: bool = True) -> Path:
    """Write Fashion-MNIST JPEG folders under ``out`` (train/, val/); no-op if already complete."""
    from tqdm import tqdm

    out = Path(out)
    limits = {"train": limit_train, "val": limit_val}
    marker = _read_marker(out)
    if marker is not None:
        # Expected counts from the label headers when a source is at hand (no download for this).
        local = find_source(source, download=False)
        expected = {}
        for split, (_, lbl) in FILES.items():
            total = _label_count(local / lbl) if local else {"train": 60000, "val": 10000}[split]
            lim = limits[split]
            expected[split] = total if lim is None or total is None else min(lim, total)
        if all(marker.get(s) == expected[s] for s in FILES) and \
                all((out / s).is_dir() for s in FILES):
            print(f"{out}: already prepared ({marker['train']} train, {marker['val']} val images)")
            return out
    if out.exists() and any(out.iterdir()) and marker is None:
        raise UserError(f"{out} exists, is not empty and was not written by this tool "
                        f"(no {_MARKER}); choose another folder or delete it")

    folder = find_source(source)
    splits = {s: _load_split(folder, s, limits[s]) for s in FILES}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a hidden sibling and rename at the end: an interrupted run leaves no half folder
    # that could pass for a complete one. Leftovers from killed runs are removed first.
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the final folder should not be
    try:
        total = sum(len(imgs) for imgs, _ in splits.values())
        with tqdm(total=total, desc="fashion-mnist", unit="img",
                  disable=None if progress else True) as bar:
            for split, (images, labels) in splits.items():
                _write_split(tmp / split, images, labels, bar)
        counts = {s: int(len(imgs)) for s, (imgs, _) in splits.items()}
        info = {**counts, "classes": CLASSES, "source": str(folder), "format": "JPEG q95 L"}
        (tmp / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():  # an empty folder, or an older complete output with other counts
            old = out.parent / f".{out.name}.partial-old"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {counts['train']} train + {counts['val']} val images "
          f"({len(CLASSES)} classes) to {out / 'train'} and {out / 'val'}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dali_ba.dataset import expand_path

    parser.add_argument("out", type=expand_path, help="output folder (gets train/ and val/)")
    parser.add_argument("--source", default=None,
                        help=f"folder with the 4 idx .gz files (default: {SYSTEM_DIR}, the cache, "
                             "or apt-get download)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images")
    parser.add_argument("--limit-val", type=int, default=None, help="first N validation images")


def run(args: argparse.Namespace) -> int:
    from dali_ba.outputs import check_output_dir

    check_output_dir(args.out, "OUT")
    for flag in ("limit_train", "limit_val"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    prepare_fashion_mnist(args.out, args.source, args.limit_train, args.limit_val)
    return 0
