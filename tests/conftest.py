"""Shared fixtures: small folders of real JPEG files, written with PIL, decoded by DALI in tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image


def write_image_folder(root: Path, classes: int = 3, per_class: int = 16, seed: int = 0, size_range=(40, 90)) -> Path:
    """ImageFolder of random-content RGB JPEGs with varied sizes (class_<k>/<i>.jpg)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(*size_range, size=2)
            gradient = np.linspace(0, 255, w)[None, :, None] * rng.random(3)
            noise = rng.normal(0, 40, (h, w, 3))
            pixels = np.clip(gradient + noise + 60 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def write_indexed_folder(root: Path, count: int, classes: int = 2) -> Path:
    """Flat-colour 16×16 JPEGs whose grey level encodes their index (read back with index_of)."""
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 10 + 5 * i, np.uint8)).save(folder / f"{i:03d}.jpg", quality=95)
    return root


def index_of(image_chw) -> int:
    """Inverse of write_indexed_folder for an un-normalised (mean 0, std 1) float image."""
    return int(round((float(image_chw.mean()) * 255 - 10) / 5))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def write_trainer_data(root: Path) -> Path:
    """Train (4 classes × 16) and val (4 × 5) folders of small JPEGs for trainer tests."""
    write_image_folder(root / "train", classes=4, per_class=16, size_range=(32, 48))  # 64 images
    write_image_folder(root / "val", classes=4, per_class=5, seed=1, size_range=(32, 48))  # 20 images
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Trainer data (``write_trainer_data``), fresh per test module; the DDP test modules define
    their own ``data`` (an indexed train folder) in its place."""
    return write_trainer_data(tmp_path_factory.mktemp("trainer_data"))


def last_checkpoint(out: Path) -> dict:
    """``OUT/checkpoints/last.pt`` of a trainer run, loaded."""
    from trainers import checkpoint as ckpt

    return ckpt.load(out / "checkpoints" / ckpt.LAST)


def tiny(root: Path, out: Path, /, **sections) -> dict:
    """A trainer config dict: B=8, M=2, 24×24, smallnet -> 8 steps per epoch, 2 epochs."""
    values = {
        "data": {"train_root": str(root / "train"), "val_root": str(root / "val"), "batch_size": 8, "num_views": 2,
                 "image_size": 24, "augment": "cifar", "num_threads": 1, "device": "cpu"},
        "model": {"arch": "smallnet"},
        "optim": {"lr": 0.2, "reference_batch": 8},
        "schedule": {"kind": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 2, "out_dir": str(out), "resume": "auto", "log_every": 1},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    return values


def write_yaml(values: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto, its own process) for the whole session: see tests/s3_server.py."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's S3 server, with AWS_ENDPOINT_URL and credentials set for boto3 and
    DALI (``S3Bucket``: ``.url(prefix)``, ``.keys()``, ``.read(key)``, ``.client``)."""
    from s3_server import new_bucket

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return new_bucket(s3_server)
