"""Odd but valid images decode; bad paths, bad config and broken files give errors that name them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from dali_ba import BatchAugmentLoader, EvalLoader, load_config
from dali_ba.errors import ConfigError, DatasetError, DecodeError


def write_odd_images(folder):
    """Valid files that trip simpler decoders: each must decode with DALI."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = lambda h, w: (rng.random((h, w, 3)) * 255).astype(np.uint8)  # noqa: E731
    Image.fromarray(rgb(40, 50)[..., 0]).save(folder / "grayscale.jpg", quality=90)
    Image.fromarray(rgb(40, 50)).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.fromarray(rgb(64, 48)).save(folder / "progressive.jpg", quality=90, progressive=True)
    Image.fromarray(rgb(2, 3)).save(folder / "tiny.jpg", quality=90)
    Image.fromarray(rgb(12, 3000)).save(folder / "very_wide.jpg", quality=90)
    Image.fromarray(rgb(30, 30)).save(folder / "png_inside.jpg", format="PNG")
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_odd_valid_images_decode(tmp_path, augment):
    names = write_odd_images(tmp_path / "odd" / "only_class")
    loader = BatchAugmentLoader(tmp_path / "odd", batch_size=len(names), num_views=2, image_size=20,
                                augment=augment, num_threads=1, device="cpu")
    images, labels = next(iter(loader))
    assert images.shape == (2 * len(names), 3, 20, 20) and torch.isfinite(images).all()
    evaluated = sum(
        len(x) for x, _ in EvalLoader(tmp_path / "odd", batch_size=4, image_size=20, augment=augment, device="cpu")
    )
    assert evaluated == len(names)


def test_missing_root_names_it(tmp_path):
    with pytest.raises(DatasetError, match=f"image folder not found: {tmp_path / 'nope'}"):
        BatchAugmentLoader(tmp_path / "nope", device="cpu")


def test_empty_root_and_empty_class_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=f"no class folders in {tmp_path}"):
        BatchAugmentLoader(tmp_path, device="cpu")
    write_image_folder(tmp_path, classes=2, per_class=4)
    (tmp_path / "class_9_empty").mkdir()
    (tmp_path / "class_9_empty" / "README.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="class_9_empty"):
        BatchAugmentLoader(tmp_path, batch_size=2, device="cpu")


def test_hidden_and_non_image_files_are_skipped(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=4)
    (tmp_path / "class_0" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / "class_0" / "README.txt").write_text("notes")
    (tmp_path / ".hidden_class").mkdir()
    loader = BatchAugmentLoader(tmp_path, batch_size=8, num_views=1, image_size=16, device="cpu")
    assert loader.classes == ["class_0", "class_1"] and len(loader.dataset) == 8
    assert next(iter(loader))[0].shape == (8, 3, 16, 16)


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("data.num_views=0", "data.num_views"),
        ("data.bogus_key=1", "data.bogus_key"),
        ("data.batch_size=many", "data.batch_size"),
        ("data.augment=autoaugment", "data.augment"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, culprit):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("data:\n  num_views: 4\n")
    with pytest.raises(ConfigError, match=culprit):
        load_config(recipe, overrides=[override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("data:\n  num_veiws: 4\n")
    with pytest.raises(ConfigError, match=f"{recipe}: data.num_veiws: unknown key"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_num_views_zero_in_the_api_is_named(image_folder):
    with pytest.raises(ConfigError, match="num_views"):
        BatchAugmentLoader(image_folder, num_views=0, device="cpu")


# Not text or random bytes: DALI 2.4's CPU decoder now and then crashes the process (instead of
# raising) on non-image content inside a batch (docs/reliability.md); `verify` screens those out.
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_broken_file_met_while_loading_is_named(tmp_path, damage):
    write_image_folder(tmp_path, classes=2, per_class=8)
    broken = tmp_path / "class_1" / "003.jpg"
    broken.write_bytes(broken.read_bytes()[:300] if damage == "truncated" else b"")
    loader = BatchAugmentLoader(tmp_path, batch_size=4, num_views=2, image_size=16, num_threads=1, device="cpu")
    with pytest.raises(DecodeError) as info:
        for _ in loader:
            pass
    assert str(broken) in str(info.value) and "dali-ba data verify" in str(info.value)
    assert info.value.bad_files == [str(broken)]


def test_truncated_file_is_named_in_eval(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=6)
    victim = tmp_path / "class_0" / "002.jpg"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 3])
    with pytest.raises(DecodeError, match=str(victim)):
        for _ in EvalLoader(tmp_path, batch_size=4, image_size=16, device="cpu"):
            pass
