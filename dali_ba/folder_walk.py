"""Walk the class folders of an ImageFolder root, following links safely.

A file belongs to the class folder it really lives in (after following links); a file that lives
outside the root belongs to the class folder the link to it was found in (a "symlink farm" of
images stored elsewhere). So a link that leads back into the tree (``ln -s .. train/a/loop``), or
from one class to another class's images, adds nothing: each real file is listed once, under its
own class. Links to the root or to a folder that contains it are not followed (a loop); a folder
or file outside the root reached from two classes would have two labels, and two class folders
that are the same folder would too: both are refused. Only regular files are images (a FIFO or a
device named ``x.jpg`` would block or never end a read). Folders are resolved once each and files
only when they are links, so a scan costs about one ``scandir`` per folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from dali_ba.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pnm", ".ppm")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both absolute and normalised)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class FolderWalk:
    """The images of every class folder of ``base`` (an absolute, resolved root), by label.

    ``files[label]``: (path, real path) pairs, where ``path`` lies under ``base`` (the file's own
    place for files inside the root, the link's place for files outside it). ``ignored``:
    ``(path, why)`` for every entry the scan left out."""

    base: str
    classes: List[str]
    files: List[List[str]] = field(default_factory=list)
    ignored: List[Tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._real_class: Dict[str, int] = {}
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.base, name)
            real = os.path.realpath(folder)
            if _inside(self.base, real):
                raise DatasetError(f"class folder {folder} is a link to {real}, which contains {self.base}: "
                                   "a link loop; make it a real folder")
            for other, label2 in self._real_class.items():
                if _inside(real, other) or _inside(other, real):
                    raise DatasetError(
                        f"class folders {os.path.join(self.base, self.classes[label2])} and {folder} lead to the same "
                        f"images ({other} and {real}, through links): an image cannot have two labels")
            self._real_class[real] = label
        self._seen_dirs: Dict[str, int] = {}  # real folder -> label it was walked for
        self._seen_files: Dict[str, Tuple[int, str]] = {}  # real file outside the root -> (label, path)
        self.files = [self._walk(label) for label in range(len(self.classes))]

    def _owner(self, real: str) -> Optional[int]:
        """The label of the class folder that really holds ``real``, or None."""
        probe = real
        while True:
            label = self._real_class.get(probe)
            if label is not None:
                return label
            parent = os.path.dirname(probe)
            if parent == probe:
                return None
            probe = parent

    def _walk(self, label: int) -> List[str]:
        top = os.path.join(self.base, self.classes[label])
        self._top = os.path.realpath(top)
        self._listed: set = set()
        found: List[str] = []
        self._seen_dirs[self._top] = label
        stack = [(top, self._top, label)]  # (path under base, its real path, owner: label or None)
        while stack:
            folder, real_folder, owner = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from None
            for entry in entries:
                if entry.name.startswith("."):
                    self.ignored.append((entry.path, "hidden"))
                    continue
                link = entry.is_symlink()
                real = os.path.realpath(entry.path) if link else os.path.join(real_folder, entry.name)
                entry_owner = self._owner(real) if link or owner is None else owner
                try:
                    is_dir, is_file = entry.is_dir(), entry.is_file()
                except OSError:
                    is_dir = is_file = False
                if is_dir:
                    self._enter(entry.path, real, entry_owner, label, stack)
                elif not is_file:
                    self.ignored.append((entry.path, "broken link" if link and not os.path.exists(entry.path)
                                         else "not a regular file"))
                elif not is_image_name(entry.name):
                    self.ignored.append((entry.path, "not an image file name"))
                else:
                    path = self._accept(entry.path, real, entry_owner, label)
                    if path is not None:
                        found.append(path)
        return sorted(found)

    def _enter(self, path: str, real: str, owner: Optional[int], label: int, stack: list) -> None:
        if owner is not None and owner != label:
            self.ignored.append((path + "/", f"a link into class folder {self.classes[owner]}: its images count there"))
        elif owner is None and _inside(self.base, real):
            self.ignored.append((path + "/", f"a link to {real}, which contains the root: a link loop, not followed"))
        elif owner is None and _inside(real, self.base):
            self.ignored.append((path + "/", "a link to a folder of the root outside its class folders"))
        elif real in self._seen_dirs:
            walked_for = self._seen_dirs[real]
            if owner is None and walked_for != label:
                raise DatasetError(f"{path} and a folder of class {self.classes[walked_for]} both lead to {real} "
                                   f"(links): its images cannot have two labels")
            self.ignored.append((path + "/", f"leads to {real} again (a link): already scanned"))
        else:
            self._seen_dirs[real] = label
            if path.lower().endswith(IMAGE_EXTENSIONS):
                self.ignored.append((path + "/", "a folder named like an image: scanned as a sub-folder"))
            stack.append((path, real, owner))

    def _accept(self, path: str, real: str, owner: Optional[int], label: int) -> Optional[str]:
        """The path to list for an image file, or None when it is listed already or elsewhere."""
        if owner is not None and owner != label:
            self.ignored.append((path, f"a link to {real}, an image of class folder {self.classes[owner]}: "
                                       "counted there"))
            return None
        if owner is not None:  # really in this class folder: listed once, at its own place
            canonical = os.path.join(self.base, self.classes[label]) + real[len(self._top):]
        elif _inside(real, self.base):
            self.ignored.append((path, f"a link to {real}, a file of the root outside its class folders"))
            return None
        else:
            previous = self._seen_files.get(real)
            if previous is not None and previous[0] != label:
                raise DatasetError(f"{path} and {previous[1]} are links to the same file {real} in class folders "
                                   f"{self.classes[label]} and {self.classes[previous[0]]}: it cannot have two labels")
            self._seen_files.setdefault(real, (label, path))
            canonical = self._seen_files[real][1]
        if canonical in self._listed:
            self.ignored.append((path, f"leads to {canonical} (a link): counted once"))
            return None
        self._listed.add(canonical)
        return canonical
