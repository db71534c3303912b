"""Find the images of a dataset: an ImageFolder root (``root/<class>/<image>``) or a file list.

We list files ourselves instead of letting ``readers.file`` walk the folder, because then we
(1) skip hidden files and non-images instead of failing on them mid-epoch, (2) reject empty class
folders that DALI silently accepts, (3) own the global per-epoch shuffle and the shard split, so
we always know which files are in a batch and can name the one that failed to decode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from dali_ba.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pnm", ".ppm")


@dataclass(frozen=True)
class Dataset:
    """Absolute file paths, integer labels (index into ``classes``) and sorted class names."""

    root: str
    files: List[str]
    labels: np.ndarray  # int32, one per file
    classes: List[str]

    def __len__(self) -> int:
        return len(self.files)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_classes(root: Path) -> List[str]:
    """Sorted, non-hidden sub-folder names (the ImageFolder convention: index = label)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _is_url(path: str | Path) -> bool:
    return "://" in str(path)


def check_dataset_paths(root: str | Path, file_list: Optional[str | Path] = None) -> None:
    """DatasetError unless ``root`` is a folder and ``file_list`` (if any) a file: a check that
    costs nothing, so a trainer can make it before loading anything heavy. Object-storage URLs are
    checked when they are read (a packed dataset's manifest, a file list)."""
    if not _is_url(root) and not Path(root).expanduser().is_dir():
        raise DatasetError(f"image folder not found: {root}")
    if file_list is not None and not _is_url(file_list) and not Path(file_list).expanduser().is_file():
        raise DatasetError(f"file list not found: {file_list}")


def scan_image_folder(root: str | Path, file_list: Optional[str | Path] = None, *,
                      allow_empty_classes: bool = False) -> Dataset:
    """Return the dataset under ``root``; with ``file_list``, read ``relative/path label`` lines.

    Raises DatasetError naming the path when the root is missing, has no class folders, a class
    folder holds no image (unless ``allow_empty_classes``: ``dali-ba data verify`` reports them
    instead), or a file-list line is malformed.
    """
    check_dataset_paths(root, file_list)
    if _is_url(root):
        if file_list is None:
            raise DatasetError(f"{root}: an object-storage root needs a file list, or must be a packed dataset "
                               "(see `dali-ba data pack`)")
        return _read_remote_file_list(str(root), str(file_list))
    root = Path(root).expanduser()
    if file_list is not None:
        return _read_file_list(root, Path(file_list).expanduser())
    classes = list_classes(root)
    if not classes:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/<image>.jpg)")
    files: List[str] = []
    labels: List[int] = []
    empty: List[str] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        found = sorted(_class_images(str(class_dir.resolve())))
        if not found:
            empty.append(str(class_dir))
        files.extend(found)
        labels.extend([label] * len(found))
    if empty and not allow_empty_classes:
        raise DatasetError(
            f"class folder(s) with no images: {', '.join(empty[:5])}"
            + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
            + " — remove them or add images (labels are assigned by sorted folder name)"
        )
    return Dataset(str(root.resolve()), files, np.asarray(labels, dtype=np.int32), classes)


def _class_images(class_dir: str) -> Iterator[str]:
    """Image files under ``class_dir`` (an absolute, resolved path), hidden folders skipped.
    Paths are joined, not resolved one by one (``Path.resolve`` per file is slow at ImageNet scale)."""
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (os.path.join(dirpath, f) for f in filenames if _is_image(f))


def _parse_file_list(text: str, where: str) -> tuple[List[str], List[int]]:
    """(relative paths, labels) of the ``relative/path label`` lines of a file list."""
    paths: List[str] = []
    labels: List[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.rpartition(" ")
        if not path or not label.lstrip("-").isdigit() or int(label) < 0:
            raise DatasetError(f"{where}:{number}: expected 'relative/path label', got {line!r}")
        paths.append(path)
        labels.append(int(label))
    if not paths:
        raise DatasetError(f"file list {where} lists no images")
    return paths, labels


def _read_remote_file_list(root: str, file_list: str) -> Dataset:
    """A file list (local or in object storage) of objects under an ``s3://``/``gs://`` root; the
    labels name the classes ("0", "1", ...)."""
    from dali_ba import storage
    from dali_ba.errors import UserError

    try:
        data = storage.read_bytes(file_list)
    except UserError as exc:
        raise DatasetError(str(exc)) from None
    if data is None:
        raise DatasetError(f"file list not found: {file_list}")
    paths, labels = _parse_file_list(data.decode("utf-8", "surrogateescape"), file_list)
    base = root.rstrip("/")
    files = [f"{base}/{os.path.normpath(p).lstrip('/')}" for p in paths]
    classes = [str(i) for i in range(max(labels) + 1)]
    return Dataset(base, files, np.asarray(labels, dtype=np.int32), classes)


def _read_file_list(root: Path, file_list: Path) -> Dataset:
    """The ``relative/path label`` lines of ``file_list`` (already checked by ``check_dataset_paths``)."""
    base = str(root.resolve())
    paths, labels = _parse_file_list(file_list.read_text(), str(file_list))
    files = [os.path.normpath(os.path.join(base, p)) for p in paths]
    num_classes = max(labels) + 1
    folder_classes = list_classes(root)
    # The class folders name the labels when there are enough of them (a clean list written by
    # `dali-ba data verify` keeps the folder labels, also when a class folder has no usable image).
    classes = folder_classes if len(folder_classes) >= num_classes else [str(i) for i in range(num_classes)]
    return Dataset(str(root.resolve()), files, np.asarray(labels, dtype=np.int32), classes)


def ignored_entries(root: str | Path) -> List[str]:
    """What a folder scan leaves out under the class folders of ``root``: hidden files and folders,
    and files that are not images by their extension (``.DS_Store``, ``README.txt``, ...).
    Folders named like images (``x.jpg/``) are sub-folders to the scan, so they are listed too."""
    root = Path(root)
    out: List[str] = []
    for name in list_classes(root):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            hidden = [d for d in dirnames if d.startswith(".")]
            out.extend(str(Path(dirpath, d)) + "/" for d in hidden)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            out.extend(str(Path(dirpath, d)) + "/" for d in dirnames if d.lower().endswith(IMAGE_EXTENSIONS))
            out.extend(str(Path(dirpath, f)) for f in filenames if not _is_image(f))
    return sorted(out)


def align_classes(val: Dataset, train_classes: Sequence[str], train_root: str, val_root: str) -> Dataset:
    """``val`` labelled by the training set's class order. Validation may lack some training
    classes (its labels are remapped, so that class k means the same in both), but a class the
    training set does not have makes accuracy meaningless: DatasetError naming it."""
    if list(val.classes) == list(train_classes):
        return val
    unknown = sorted(set(val.classes) - set(train_classes))
    if unknown:
        raise DatasetError(
            f"classes differ between {train_root} and {val_root}: only in val {unknown[:5]}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            + f", only in train {sorted(set(train_classes) - set(val.classes))[:5]}"
        )
    index = {name: i for i, name in enumerate(train_classes)}
    remap = np.asarray([index[name] for name in val.classes], dtype=np.int32)
    return Dataset(val.root, val.files, remap[val.labels], list(train_classes))
