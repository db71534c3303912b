"""Dataset tools on real files, CPU only: synth, the Fashion-MNIST converter, DALI decode verify."""
from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_ba import cli
from dali_ba.data import fashion_mnist as fm
from dali_ba.data.synth import make_synthetic_imagefolder
from dali_ba.data.verify import BadFile, decode_check_one, find_undecodable
from dali_ba.errors import DatasetError, UserError


@pytest.fixture
def run_cli(monkeypatch):
    """``dali_ba.cli.main`` with only the data commands registered (isolates us from the others)."""
    monkeypatch.setattr(cli, "_COMMANDS", [c for c in cli._COMMANDS if c[0][0] == "data"])
    return lambda *argv: cli.main([str(a) for a in argv])


def _jpegs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


# ----------------------------------------------------------------------------- synth
def test_synth_counts_sizes_and_decodes(tmp_path):
    out = make_synthetic_imagefolder(tmp_path / "s", images=12, classes=3, val_images=6, seed=1,
                                     progress=False)
    train, val = _jpegs(out / "train"), _jpegs(out / "val")
    assert len(train) == 12 and len(val) == 6
    assert sorted(p.name for p in (out / "train").iterdir()) == ["class_000", "class_001", "class_002"]
    assert [len(_jpegs(out / "train" / c)) for c in ("class_000", "class_001", "class_002")] == [4, 4, 4]
    sizes = set()
    for path in train + val:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            sizes.add(im.size)
            assert 350 <= im.size[0] <= 650 and 150 <= im.size[1] <= 750
            assert np.asarray(im).std() > 5  # not a flat image
    assert len(sizes) > 5
    assert find_undecodable([str(p) for p in train + val], progress=False) == []


def test_synth_is_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_imagefolder(tmp_path / "a", 6, 2, seed=7, progress=False)
    b = make_synthetic_imagefolder(tmp_path / "b", 6, 2, seed=7, progress=False, workers=2)
    c = make_synthetic_imagefolder(tmp_path / "c", 6, 2, seed=8, progress=False)
    files = [p.relative_to(a) for p in _jpegs(a)]
    assert files == [p.relative_to(b) for p in _jpegs(b)]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # any worker count
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_synth_errors_and_cli(tmp_path, run_cli, capsys):
    with pytest.raises(UserError, match="--classes"):
        make_synthetic_imagefolder(tmp_path / "x", images=2, classes=5)
    assert run_cli("data", "synth", tmp_path / "s", "--images", 4, "--classes", 2) == 0
    assert str(tmp_path / "s" / "train") in capsys.readouterr().out
    # A second run must not mix into existing data, unless asked to replace it.
    assert run_cli("data", "synth", tmp_path / "s", "--images", 4, "--classes", 2) == 2
    assert str(tmp_path / "s" / "train") in capsys.readouterr().err
    assert run_cli("data", "synth", tmp_path / "s", "--images", 2, "--classes", 2, "--overwrite") == 0
    assert len(_jpegs(tmp_path / "s")) == 2


# ----------------------------------------------------------------------------- fashion-mnist
def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_source(folder: Path, n_train: int = 25, n_val: int = 12, seed: int = 0) -> dict:
    """Real-format idx files with smooth 28x28 images (JPEG q95 keeps them close)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    for split, n in (("train", n_train), ("val", n_val)):
        a, b, c = rng.uniform(0, 1, size=(3, n, 1, 1))
        images = np.clip(255 * (a * xx + b * yy * (1 - xx) + c * np.sin(6 * xx * yy)) / 2, 0, 255)
        labels = np.arange(n) % 10
        img_name, lbl_name = fm.FILES[split]
        _write_idx(folder / img_name, images.astype(np.uint8), 2051)
        _write_idx(folder / lbl_name, labels, 2049)
        data[split] = (images.astype(np.uint8), labels)
    return data


def test_fashion_mnist_converts_round_trips_and_is_idempotent(tmp_path, run_cli, capsys):
    src, out = tmp_path / "src", tmp_path / "out" / "fm"
    data = _fake_source(src)
    assert run_cli("data", "fashion-mnist", out, "--source", src) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == fm.CLASSES
    for split, (images, labels) in data.items():
        assert len(_jpegs(out / split)) == len(images)
        for i, (img, label) in enumerate(zip(images, labels)):
            with Image.open(out / split / fm.CLASSES[label] / f"{i:05d}.jpg") as im:
                assert im.mode == "L" and im.size == (28, 28)
                err = np.abs(np.asarray(im, dtype=np.int16) - img.astype(np.int16))
            assert err.mean() < 2.0 and err.max() < 24
    assert (out / ".complete").is_file()
    assert not list(out.parent.glob(".fm.partial-*"))
    capsys.readouterr()

    before = {p: p.stat().st_mtime_ns for p in _jpegs(out)}
    assert run_cli("data", "fashion-mnist", out, "--source", src) == 0
    assert "already prepared" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in _jpegs(out)}

    # Other counts than the marker's: rebuilt, not mixed with the old files.
    fm.prepare_fashion_mnist(out, src, limit_train=7, limit_val=3, progress=False)
    assert len(_jpegs(out / "train")) == 7 and len(_jpegs(out / "val")) == 3


def test_fashion_mnist_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "fm"
    _fake_source(src)

    def boom(split_dir, images, labels, bar):
        (split_dir / "0_T-shirt_top").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(fm, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        fm.prepare_fashion_mnist(out, src, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not gzip at all"), "not a readable gzip"),
    (lambda p: _write_idx(p, np.zeros((3, 28, 28)), 2049), "bad idx magic"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100])), "header says"),
])
def test_fashion_mnist_corrupt_idx_names_the_file(tmp_path, run_cli, capsys, damage, message):
    src = tmp_path / "src"
    _fake_source(src)
    bad = src / "train-images-idx3-ubyte.gz"
    damage(bad)
    with pytest.raises(DatasetError, match=message) as info:
        fm.prepare_fashion_mnist(tmp_path / "out", src, progress=False)
    assert str(bad) in str(info.value)
    assert run_cli("data", "fashion-mnist", tmp_path / "out", "--source", src) == 2
    assert str(bad) in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_fashion_mnist_refuses_foreign_folder_and_missing_source(tmp_path):
    src = tmp_path / "src"
    _fake_source(src)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        fm.prepare_fashion_mnist(tmp_path / "mine", src, progress=False)
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        fm.prepare_fashion_mnist(tmp_path / "out", src, progress=False)


def _fake_apt(tmp_path: Path, payload: Path) -> Path:
    """apt-get that needs an `update` before `download` works, and a dpkg-deb that 'extracts'."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"""#!/bin/sh
if [ "$1" = update ]; then touch {state}; exit 0; fi
if [ "$1" = download ] && [ -e {state} ]; then echo deb > "$2"_1.0_all.deb; exit 0; fi
echo "E: Unable to locate package $2" >&2; exit 100
""")
    (bin_dir / "dpkg-deb").write_text(f"""#!/bin/sh
mkdir -p "$3/usr/share/datasets/fashion-mnist" && cp {payload}/* "$3/usr/share/datasets/fashion-mnist/"
""")
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_fashion_mnist_fetches_with_apt_after_update(tmp_path, monkeypatch):
    payload = tmp_path / "payload"
    _fake_source(payload, n_train=10, n_val=10)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setenv("DALI_BA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{_fake_apt(tmp_path, payload)}:{os.environ['PATH']}")
    fm.prepare_fashion_mnist(tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == \
        sorted(n for pair in fm.FILES.values() for n in pair)
    assert len(_jpegs(tmp_path / "out")) == 20


def test_fashion_mnist_without_apt_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setenv("DALI_BA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(UserError, match="apt-get.*dali-ba data synth"):
        fm.prepare_fashion_mnist(tmp_path / "out", progress=False)


def test_fashion_mnist_real_data_when_present(tmp_path):
    source = fm.find_source(download=False)
    if source is None:
        pytest.skip("no local Fashion-MNIST copy (system path or cache)")
    fm.prepare_fashion_mnist(tmp_path / "fm", limit_train=40, limit_val=20, progress=False)
    assert len(_jpegs(tmp_path / "fm" / "train")) == 40 and len(_jpegs(tmp_path / "fm" / "val")) == 20
    assert len([d for d in (tmp_path / "fm" / "train").iterdir() if any(d.iterdir())]) > 5


# ----------------------------------------------------------------------------- verify
def _image(seed: int = 0, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def mixed_folder(tmp_path):
    """ImageFolder with good files of awkward kinds and bad files; returns (root, good, bad)."""
    root = tmp_path / "data"
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    _image(0).save(a / "rgb.jpg", quality=90)
    _image(1).convert("L").save(a / "gray.jpg")
    _image(2).convert("CMYK").save(a / "cmyk.jpg")
    _image(3).save(b / "progressive.jpg", progressive=True)
    _image(4).save(b / "png_named.jpg", format="PNG")
    _image(5, size=(2000, 8)).save(b / "wide.jpg")
    (a / "empty.jpg").write_bytes(b"")
    full = (a / "rgb.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (b / "text.jpg").write_text("this is not an image\n" * 20)
    (b / "random.jpg").write_bytes(np.random.default_rng(9).bytes(3000))
    good = [a / "rgb.jpg", a / "gray.jpg", a / "cmyk.jpg", b / "progressive.jpg",
            b / "png_named.jpg", b / "wide.jpg"]
    bad = [a / "empty.jpg", a / "truncated.jpg", b / "text.jpg", b / "random.jpg"]
    return root, [str(p) for p in good], [str(p) for p in bad]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_find_undecodable_names_exactly_the_bad_files(mixed_folder, batch_size):
    root, good, bad = mixed_folder
    (root / "a" / "x.jpg").mkdir()
    paths = sorted(good + bad + [str(root / "a" / "x.jpg"), str(root / "missing.jpg")])
    found = find_undecodable(paths, num_threads=2, batch_size=batch_size, progress=False)
    assert all(isinstance(f, BadFile) and f.reason for f in found)
    assert [f.path for f in found] == sorted(bad + [str(root / "a" / "x.jpg"), str(root / "missing.jpg")])
    reasons = {Path(f.path).name: f.reason for f in found}
    assert "0 bytes" in reasons["empty.jpg"] and "directory" in reasons["x.jpg"]
    assert "does not exist" in reasons["missing.jpg"]
    assert "DALI" in reasons["text.jpg"] and "not a known image format" in reasons["text.jpg"]
    assert "DALI" in reasons["truncated.jpg"] and "JPEG" in reasons["truncated.jpg"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_reported(mixed_folder):
    path = mixed_folder[1][0]
    os.chmod(path, 0)
    try:
        assert "permission denied" in decode_check_one(path)
    finally:
        os.chmod(path, 0o644)


def test_decode_check_one(mixed_folder):
    root, good, bad = mixed_folder
    assert all(decode_check_one(p) is None for p in good)
    assert all(decode_check_one(p) for p in bad)
    assert decode_check_one(good[0]) is None  # earlier failures leave later checks unaffected


def test_verify_cli_exit_codes_and_clean_list(mixed_folder, tmp_path, run_cli, capsys):
    root, good, bad = mixed_folder
    clean = tmp_path / "lists" / "clean.txt"
    assert run_cli("data", "verify", root, "--write-clean-list", clean, "--threads", 1) == 1
    out = capsys.readouterr().out
    assert all(p in out for p in bad) and not any(f"{p}:" in out for p in good)
    assert f"{len(bad)} of {len(good) + len(bad)} files" in out
    lines = clean.read_text().splitlines()
    assert sorted(lines) == sorted(f"{os.path.relpath(p, root)} {0 if '/a/' in p else 1}" for p in good)
    # The clean list is a valid file list: verifying through it finds nothing.
    assert run_cli("data", "verify", root, "--file-list", clean) == 0
    assert f"all {len(good)} files" in capsys.readouterr().out
    # A file list can name a directory (a folder scan never lists one): reported, exit 1.
    (root / "a" / "x.jpg").mkdir()
    listed = tmp_path / "with_dir.txt"
    listed.write_text(clean.read_text() + "a/x.jpg 0\n")
    assert run_cli("data", "verify", root, "--file-list", listed) == 1
    assert "is a directory" in capsys.readouterr().out
    assert run_cli("data", "verify", tmp_path / "nowhere") == 2
