"""Hostile or careless datasets: links, file lists and file names that would train on wrong data.

Real folders of real JPEGs, real symbolic links, FIFOs and odd file names; the real folder scan,
loaders (DALI decodes every file it is handed) and `dali-ba data verify` command line. Each test
fails on a dali-ba that labels an image by a path it merely reaches, reads a list that contradicts
itself or the class folders, or cannot read back a clean list of the names it wrote.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

from dali_ba import BatchAugmentLoader
from dali_ba.dataset import ignored_entries, scan_image_folder
from dali_ba.errors import DatasetError
from dali_ba.index import pack_index, unpack_index

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "dali_ba.cli"]


def greek(root: Path, per_class: int = 9) -> Path:
    """ImageFolder with classes alpha, beta, gamma (27 images by default)."""
    write_image_folder(root, classes=3, per_class=per_class, size_range=(16, 24))
    for old, new in zip(("class_0", "class_1", "class_2"), ("alpha", "beta", "gamma")):
        (root / old).rename(root / new)
    return root


def by_label(dataset) -> dict:
    """{class name: sorted file names relative to the root}."""
    out: dict = {c: [] for c in dataset.classes}
    for path, label in zip(dataset.files, dataset.labels):
        out[dataset.classes[label]].append(os.path.relpath(path, dataset.root))
    return {c: sorted(v) for c, v in out.items()}


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], cwd=kw.pop("cwd", REPO), env=kw.pop("env", ENV),
                          capture_output=True, text=True, timeout=300, **kw)


# ------------------------------------------------------------------------------------ links
def test_a_link_loop_in_a_class_folder_lists_each_image_once_under_its_own_class(tmp_path):
    """The issue's example: `ln -s .. train/alpha/loop` made 27 images 1,098 entries, other
    classes' images labelled alpha; now 27, each under the folder it lives in."""
    train = greek(tmp_path / "train")
    clean = by_label(scan_image_folder(train))
    (train / "alpha" / "loop").symlink_to("..")
    dataset = scan_image_folder(train)
    assert len(dataset) == 27 and by_label(dataset) == clean
    loader = BatchAugmentLoader(train, batch_size=9, num_views=1, image_size=8, device="cpu", num_threads=1)
    assert len(loader) == 3 and len(loader.dataset) == 27
    assert any("loop" in e and "link loop" in e for e in ignored_entries(train))


def test_links_between_classes_count_an_image_once_where_it_lives(tmp_path):
    train = greek(tmp_path / "train")
    clean = by_label(scan_image_folder(train))
    (train / "alpha" / "stolen.jpg").symlink_to(train / "beta" / "000.jpg")  # a file of another class
    (train / "alpha" / "beta_too").symlink_to("../beta")  # a folder of another class
    (train / "alpha" / "same.jpg").symlink_to("000.jpg")  # a second name in its own class
    (train / "alpha" / "sub").mkdir()
    (train / "alpha" / "sub" / "up").symlink_to("..")  # a loop inside the class
    (train / "gamma" / "up").symlink_to("../..")  # the root's parent: it contains the root
    assert by_label(scan_image_folder(train)) == clean


def test_images_stored_outside_the_root_take_the_label_of_the_link(tmp_path):
    """A 'symlink farm' (class folders of links to images elsewhere) keeps working; an outside
    image linked from two classes would have two labels: refused in one line."""
    store = write_image_folder(tmp_path / "store", classes=2, per_class=4, size_range=(16, 24))
    train = greek(tmp_path / "train", per_class=2)
    (train / "alpha" / "far.jpg").symlink_to(store / "class_1" / "000.jpg")
    (train / "beta" / "many").symlink_to(store / "class_0")  # a folder outside the root
    dataset = scan_image_folder(train)
    got = by_label(dataset)
    assert "alpha/far.jpg" in got["alpha"]
    assert {f"beta/many/{i:03d}.jpg" for i in range(4)} <= set(got["beta"])
    assert len(dataset) == 6 + 1 + 4
    (train / "gamma" / "twice.jpg").symlink_to(store / "class_0" / "001.jpg")  # also reached through beta/many
    with pytest.raises(DatasetError, match="cannot have two labels") as info:
        scan_image_folder(train)
    assert "\n" not in str(info.value)


def test_two_class_folders_that_are_the_same_folder_are_refused(tmp_path):
    train = greek(tmp_path / "train")
    (train / "delta").symlink_to("beta")
    with pytest.raises(DatasetError, match="lead to the same images"):
        scan_image_folder(train)
    (train / "delta").unlink()
    (train / "delta").symlink_to(".")  # a class folder that is the root itself
    with pytest.raises(DatasetError, match="link loop"):
        scan_image_folder(train)


def test_only_regular_files_are_images(tmp_path):
    """A FIFO named like an image would block DALI's read forever, a link to /dev/zero never end."""
    train = greek(tmp_path / "train", per_class=3)
    os.mkfifo(train / "alpha" / "pipe.jpg")
    (train / "beta" / "zero.jpg").symlink_to("/dev/zero")
    (train / "gamma" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    dataset = scan_image_folder(train)
    assert len(dataset) == 9
    reasons = "\n".join(ignored_entries(train))
    assert "pipe.jpg (not a regular file)" in reasons and "zero.jpg (not a regular file)" in reasons
    assert "dangling.jpg (broken link)" in reasons
    batches = list(BatchAugmentLoader(train, batch_size=3, num_views=1, image_size=8, device="cpu", num_threads=1))
    assert len(batches) == 3  # read to the end, nothing blocked


# ------------------------------------------------------------------------------------ file lists
@pytest.mark.parametrize("lines, message", [
    (["alpha/000.jpg 0", "beta/000.jpg 1", "alpha/000.jpg 0"], r"alpha/000.jpg is listed twice \(first at line 1\)"),
    (["alpha/000.jpg 0", "./alpha//000.jpg 1"], r"alpha/000.jpg has two labels \(0 and 1\) \(first at line 1\)"),
    (["alpha/000.jpg 0", "beta/000.jpg 7"], "label 7, but .* has 3 class folders"),
    (["alpha/000.jpg 1"], r"alpha/000.jpg is in class folder alpha \(label 0\) but the list gives label 1 \(beta\)"),
    (["../elsewhere/x.jpg 0"], "leads out of the root"),
    (["alpha/../../x.jpg 0"], "leads out of the root"),
    (["/etc/passwd 0"], "is an absolute path"),
    (["alpha/000.jpg -1"], "expected 'relative/path label'"),
    (["alpha/000.jpg 1e3"], "expected 'relative/path label'"),
    (["alpha/000.jpg \u0663"], "expected 'relative/path label'"),  # an Arabic-Indic 3: int() reads it
])
def test_a_file_list_that_contradicts_itself_or_the_classes_is_one_line(tmp_path, lines, message):
    train = greek(tmp_path / "train", per_class=2)
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        scan_image_folder(train, listed)
    assert str(listed) in str(info.value) and "\n" not in str(info.value)


def test_a_bad_file_list_stops_the_cli_before_any_work(tmp_path):
    train = greek(tmp_path / "train", per_class=2)
    listed = tmp_path / "list.txt"
    listed.write_text("alpha/000.jpg 0\nbeta/001.jpg 0\n")  # a list written before a class folder was added
    done = run_cli("data", "verify", train, "--file-list", listed)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and f"{listed}:2: beta/001.jpg is in class folder beta" in done.stderr


def test_a_list_without_class_folders_names_classes_by_label(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    write_image_folder(tmp_path / "src", classes=1, per_class=3, size_range=(16, 24))
    for i in range(3):
        (tmp_path / "src" / "class_0" / f"{i:03d}.jpg").rename(flat / f"{i}.jpg")
    (tmp_path / "list.txt").write_text("0.jpg 0\n1.jpg 2\n2.jpg 2\n")
    dataset = scan_image_folder(flat, tmp_path / "list.txt")
    assert dataset.classes == ["0", "1", "2"] and list(dataset.labels) == [0, 2, 2]


# ------------------------------------------------------------------------------------ file names
ODD_NAMES = [
    "with space.jpg", "  leading spaces.jpg", "trailing space .jpg", "tab\there.jpg", "#hash.jpg", "caf\u00e9.jpg",
    "line\u2028separator.jpg", "next\x85line.jpg", "form\x0cfeed.jpg", "carriage\rreturn.jpg", "back\\slash.jpg",
    "7 3.jpg",
]


def odd_folder(root: Path) -> Path:
    """Class folders '#tag' (reads like a comment) and ' space' (a leading blank) and odd file
    names, one with bytes that are not UTF-8; JPEGs written by PIL."""
    write_image_folder(root, classes=2, per_class=len(ODD_NAMES) + 1, size_range=(16, 24))
    for folder, name in ((root / "class_0", "#tag"), (root / "class_1", " space")):
        files = sorted(folder.iterdir())
        for path, new in zip(files, ODD_NAMES):
            path.rename(folder / new)
        os.rename(bytes(files[-1]), bytes(folder) + b"/latin1-\xe9t\xe9.jpg")  # not UTF-8
        folder.rename(root / name)
    return root


def test_a_clean_list_reads_back_whatever_the_file_names_hold(tmp_path):
    train = odd_folder(tmp_path / "train")
    scanned = scan_image_folder(train)
    assert len(scanned) == 2 * (len(ODD_NAMES) + 1)
    clean = tmp_path / "clean.txt"
    done = run_cli("data", "verify", train, "--write-clean-list", clean, "--threads", 1)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = scan_image_folder(train, clean)
    assert listed.files == scanned.files and list(listed.labels) == list(scanned.labels)
    assert listed.classes == scanned.classes == [" space", "#tag"]
    # DALI reads every one of those names (one epoch through the list).
    loader = BatchAugmentLoader(train, file_list=clean, batch_size=len(scanned), num_views=1, image_size=8,
                                device="cpu", num_threads=1)
    images, labels = next(iter(loader))
    assert images.shape[0] == len(scanned) and sorted(labels.tolist()) == sorted(scanned.labels.tolist())


def test_a_name_no_list_line_can_hold_is_named_and_left_out(tmp_path):
    train = write_image_folder(tmp_path / "train", classes=2, per_class=2, size_range=(16, 24))
    (train / "class_0" / "000.jpg").rename(train / "class_0" / "two\nlines.jpg")
    clean = tmp_path / "clean.txt"
    done = run_cli("data", "verify", train, "--write-clean-list", clean, "--threads", 1)
    assert done.returncode == 1
    assert "two\\nlines.jpg" in done.stdout and "left out of the clean list" in done.stdout
    assert len(scan_image_folder(train, clean)) == 3


def test_the_index_shared_between_ranks_keeps_names_with_line_breaks(tmp_path):
    """Under torch.distributed rank 0 scans and sends the index: names were joined by newlines,
    so one such name shifted every later label by one."""
    train = write_image_folder(tmp_path / "train", classes=2, per_class=3, size_range=(16, 24))
    (train / "class_0" / "000.jpg").rename(train / "class_0" / "a\nb.jpg")
    dataset = scan_image_folder(train)
    again = unpack_index(pack_index(dataset))
    assert again.files == dataset.files and np.array_equal(again.labels, dataset.labels)


# ------------------------------------------------------------------------------------ ~ in paths
def test_a_tilde_in_any_path_means_home(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    env = {**ENV, "HOME": str(home)}
    assert run_cli("data", "synth", "~/syn", "--images", 6, "--classes", 2, cwd=work, env=env).returncode == 0
    assert (home / "syn" / "train" / "class_000").is_dir()
    done = run_cli("data", "verify", "~/syn/train", "--write-clean-list", "~/lists/clean.txt", "--threads", 1,
                   cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    assert (home / "lists" / "clean.txt").is_file()
    done = run_cli("show", "--root", "~/syn/train", "--images", 2, "--views", 1, "--image-size", 8,
                   "--out", "~/grid.png", cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    assert (home / "grid.png").is_file()
    assert list(work.iterdir()) == []  # no folder named '~' where the command ran
    from trainers.config import config_from_dict

    cfg = config_from_dict({}, ["data.train_root=~/syn/train", "data.train_list=~/lists/clean.txt",
                                "train.out_dir=~/run", "train.resume=~/run"])
    expanded = os.path.expanduser("~")
    assert cfg.data.train_root == f"{expanded}/syn/train" and cfg.train.out_dir == f"{expanded}/run"
    assert cfg.data.train_list == f"{expanded}/lists/clean.txt" and cfg.train.resume == f"{expanded}/run"
