"""Find the images of a dataset: an ImageFolder root (``root/<class>/<image>``) or a file list.

We list files ourselves instead of letting ``readers.file`` walk the folder, because then we
(1) skip hidden files and non-images instead of failing on them mid-epoch, (2) reject empty class
folders that DALI silently accepts, (3) own the global per-epoch shuffle and the shard split, so
we always know which files are in a batch and can name the one that failed to decode, (4) follow
links safely (``folder_walk``: each real file once, under the class folder it lives in) and
check file lists against the class folders and against themselves, so that no image is trained
on under a label it does not have.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from dali_ba.errors import DatasetError
from dali_ba.folder_walk import IMAGE_EXTENSIONS, FolderWalk, is_image_name

__all__ = ["IMAGE_EXTENSIONS", "Dataset", "align_classes", "check_dataset_paths", "expand_path", "ignored_entries",
           "is_image_name", "list_classes", "list_line", "scan_image_folder", "write_file_list"]


@dataclass(frozen=True)
class Dataset:
    """Absolute file paths, integer labels (index into ``classes``) and sorted class names."""

    root: str
    files: List[str]
    labels: np.ndarray  # int32, one per file
    classes: List[str]

    def __len__(self) -> int:
        return len(self.files)


def expand_path(path: str | os.PathLike) -> str:
    """``~`` and ``~user`` expanded, as a shell would (and as every path option of dali-ba does)."""
    return os.path.expanduser(os.fspath(path))


def list_classes(root: Path) -> List[str]:
    """Sorted, non-hidden sub-folder names (the ImageFolder convention: index = label)."""
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DatasetError(f"cannot list {root}: {exc.strerror or exc}") from None


def _is_url(path: str | Path) -> bool:
    return "://" in str(path)


def check_dataset_paths(root: str | Path, file_list: Optional[str | Path] = None) -> None:
    """DatasetError unless ``root`` is a folder and ``file_list`` (if any) a file: a check that
    costs nothing, so a trainer can make it before loading anything heavy. Object-storage URLs are
    checked when they are read (a packed dataset's manifest, a file list)."""
    if not _is_url(root) and not Path(expand_path(root)).is_dir():
        raise DatasetError(f"image folder not found: {root}")
    if file_list is not None and not _is_url(file_list) and not Path(expand_path(file_list)).is_file():
        raise DatasetError(f"file list not found: {file_list}")


def scan_image_folder(root: str | Path, file_list: Optional[str | Path] = None, *,
                      allow_empty_classes: bool = False) -> Dataset:
    """Return the dataset under ``root``; with ``file_list``, read ``relative/path label`` lines.

    Raises DatasetError naming the path when the root is missing, has no class folders, a class
    folder holds no image (unless ``allow_empty_classes``: ``dali-ba data verify`` reports them
    instead), links would give an image two labels (``folder_walk``), or a file-list line is
    malformed, repeated or contradicts the class folders (``_read_file_list``).
    """
    check_dataset_paths(root, file_list)
    if _is_url(root):
        if file_list is None:
            raise DatasetError(f"{root}: an object-storage root needs a file list, or must be a packed dataset "
                               "(see `dali-ba data pack`)")
        return _read_remote_file_list(str(root), str(file_list))
    root = Path(expand_path(root))
    if file_list is not None:
        return _read_file_list(root, Path(expand_path(file_list)))
    classes = list_classes(root)
    if not classes:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/<image>.jpg)")
    walk = FolderWalk(os.path.realpath(root), classes)
    files: List[str] = []
    labels: List[int] = []
    empty: List[str] = []
    for label, found in enumerate(walk.files):
        if not found:
            empty.append(str(root / classes[label]))
        files.extend(found)
        labels.extend([label] * len(found))
    if empty and not allow_empty_classes:
        raise DatasetError(
            f"class folder(s) with no images: {', '.join(empty[:5])}"
            + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
            + " — remove them or add images (labels are assigned by sorted folder name)"
        )
    return Dataset(walk.base, files, np.asarray(labels, dtype=np.int32), classes)


def ignored_entries(root: str | Path) -> List[str]:
    """What a folder scan leaves out under the class folders of ``root``, each as ``path`` or
    ``path (why)`` for links: hidden files and folders, files that are not images by their name or
    not regular files, and links the scan does not follow or counts elsewhere. Folders named like
    images (``x.jpg/``) are sub-folders to the scan, so they are listed too."""
    root = Path(expand_path(root))
    walk = FolderWalk(os.path.realpath(root), list_classes(root))
    return sorted(path if why in ("hidden", "not an image file name") or why.startswith("a folder named")
                  else f"{path} ({why})" for path, why in walk.ignored)


# -- file lists ------------------------------------------------------------------------------------

def list_line(relative: str, label: int) -> str:
    """One file-list line that ``_read_file_list`` reads back as exactly (relative, label); a
    ``./`` prefix keeps a name that starts with ``#`` or a blank from reading as a comment or
    being trimmed. DatasetError for a name no line can hold (a line break in it)."""
    if "\n" in relative:
        raise DatasetError(f"{relative!r}: a file name with a line break cannot be written to a file list")
    if relative[:1] in ("#", " ", "\t") or relative[:1].isspace():
        relative = "./" + relative
    return f"{relative} {int(label)}\n"


def write_file_list(path: str | Path, lines: Sequence[str]) -> None:
    """Write ``list_line`` lines atomically; names keep their bytes (surrogate escapes included)."""
    path = Path(expand_path(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
    os.replace(tmp, path)  # a reader never sees a half-written list


def _parse_file_list(text: str, where: str) -> List[Tuple[int, str, int]]:
    """(line number, relative path, label) of each ``relative/path label`` line of a file list.

    Lines are split on ``\\n`` only and names kept as they are (any file name but one with a line
    break fits in a line: ``list_line``). Paths stay under the root (no absolute paths, no ``..``
    above it) and each file is listed once, with one label."""
    entries: List[Tuple[int, str, int]] = []
    seen: dict = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        at = f"{where}:{number}"
        path, _, label_text = line.rpartition(" ")
        if not path or not re.fullmatch(r"[0-9]+", label_text):
            raise DatasetError(f"{at}: expected 'relative/path label', got {line!r}")
        label = int(label_text)
        if os.path.isabs(path):
            raise DatasetError(f"{at}: {path} is an absolute path; file-list paths are relative to the root")
        relative = os.path.normpath(path)
        if relative == ".." or relative.startswith(".." + os.sep):
            raise DatasetError(f"{at}: {path} leads out of the root; file-list paths stay under it")
        if relative in seen:
            first, first_label = seen[relative]
            kind = "is listed twice" if first_label == label else f"has two labels ({first_label} and {label})"
            raise DatasetError(f"{at}: {relative} {kind} (first at line {first}): a list names each file once")
        seen[relative] = (number, label)
        entries.append((number, relative, label))
    if not entries:
        raise DatasetError(f"file list {where} lists no images")
    return entries


def _read_remote_file_list(root: str, file_list: str) -> Dataset:
    """A file list (local or in object storage) of objects under an ``s3://``/``gs://`` root; the
    labels name the classes ("0", "1", ...)."""
    from dali_ba import storage
    from dali_ba.errors import UserError

    try:
        data = storage.read_bytes(file_list if _is_url(file_list) else expand_path(file_list))
    except UserError as exc:
        raise DatasetError(str(exc)) from None
    if data is None:
        raise DatasetError(f"file list not found: {file_list}")
    entries = _parse_file_list(data.decode("utf-8", "surrogateescape"), file_list)
    base = root.rstrip("/")
    labels = [label for _, _, label in entries]
    files = [f"{base}/{relative}" for _, relative, _ in entries]
    classes = [str(i) for i in range(max(labels) + 1)]
    return Dataset(base, files, np.asarray(labels, dtype=np.int32), classes)


def _read_file_list(root: Path, file_list: Path) -> Dataset:
    """The lines of ``file_list`` (``_parse_file_list``) under the folder ``root``. Labels are below
    the number of class folders, and a file inside a class folder has that folder's label: a list
    written before a class folder was added would otherwise shift labels without a word. A root
    without class folders names its classes by the labels ("0", "1", ...)."""
    base = os.path.realpath(root)
    folder_classes = list_classes(root)
    index = {name: i for i, name in enumerate(folder_classes)}
    try:
        text = file_list.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise DatasetError(f"cannot read file list {file_list}: {exc.strerror or exc}") from None
    entries = _parse_file_list(text, str(file_list))
    for number, relative, label in entries:
        top = relative.split(os.sep, 1)[0]
        if folder_classes and label >= len(folder_classes):
            raise DatasetError(f"{file_list}:{number}: label {label}, but {root} has {len(folder_classes)} class "
                               f"folders (labels 0-{len(folder_classes) - 1})")
        if os.sep in relative and top in index and index[top] != label:
            raise DatasetError(f"{file_list}:{number}: {relative} is in class folder {top} (label {index[top]}) but "
                               f"the list gives label {label} ({folder_classes[label]}); rewrite the list "
                               "(dali-ba data verify --write-clean-list)")
    labels = [label for _, _, label in entries]
    files = [os.path.join(base, relative) for _, relative, _ in entries]
    classes = folder_classes or [str(i) for i in range(max(labels) + 1)]
    return Dataset(base, files, np.asarray(labels, dtype=np.int32), classes)


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
