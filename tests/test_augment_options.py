"""Per-view Cutout, random erasing, RandAugment and AutoAugment on real JPEGs decoded by DALI (CPU).

Occlusions are found as the pixels that are exactly 0 in every channel of the normalised output:
the images are flat colours whose normalised values are never 0 (ImageNet mean/std).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_ba import BatchAugmentLoader, EvalLoader
from dali_ba.errors import ConfigError, LoaderStateError
from dali_ba.options import IMAGENET_MEAN, IMAGENET_STD

FLAT = dict(augment="cifar", pad=0, num_threads=1, device="cpu", layout="grouped")


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory) -> Path:
    """24 flat-colour 32×32 JPEGs (3 classes): no pixel normalises to exactly 0."""
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(3)
    for i in range(24):
        folder = root / f"class_{i % 3}"
        folder.mkdir(exist_ok=True)
        rgb = rng.integers(30, 225, size=3).astype(np.uint8)
        Image.fromarray(np.broadcast_to(rgb, (32, 32, 3)).copy()).save(folder / f"{i:02d}.jpg", quality=95)
    return root


def all_views(root, **options) -> torch.Tensor:
    """Every view of one epoch: [images, M, C, H, W]."""
    loader = BatchAugmentLoader(root, **{**FLAT, **options})
    return torch.cat([images for images, _ in loader])


def holes(view: torch.Tensor) -> torch.Tensor:
    """[H, W] bool: the pixels filled with 0 in every channel."""
    return (view == 0).all(dim=0)


def box(mask: torch.Tensor):
    """(top, bottom, left, right) inclusive bounds of the True pixels, or None."""
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def is_rectangle(mask: torch.Tensor) -> bool:
    top, bottom, left, right = box(mask)
    return int(mask.sum()) == (bottom - top + 1) * (right - left + 1)


def test_cutout_holes_are_16_pixels_at_independent_positions_in_every_view(flat_folder):
    side, size = 16, 32
    views = all_views(flat_folder, batch_size=8, num_views=4, image_size=size, cutout=side)
    assert views.shape == (24, 4, 3, size, size) and views.dtype == torch.float32
    boxes = []
    for image in views:
        boxes.append([])
        for view in image:
            mask = holes(view)
            top, bottom, left, right = box(mask)  # every view has its hole (at least 8×8 in a corner)
            assert is_rectangle(mask)
            height, width = bottom - top + 1, right - left + 1
            assert height <= side and width <= side
            # the paper's hole: 16×16 unless clipped by the border (DeVries & Taylor's centre sampling)
            assert height == side or top == 0 or bottom == size - 1
            assert width == side or left == 0 or right == size - 1
            boxes[-1].append((top, bottom, left, right))
    # the stated area on average: a 16-px hole whose centre is uniform over the 32 pixels, clipped
    length = np.mean([min(c + side // 2, size) - max(c - side // 2, 0) for c in range(size)])
    areas = [(bottom - top + 1) * (right - left + 1) for image in boxes for top, bottom, left, right in image]
    assert np.mean(areas) == pytest.approx(length ** 2, rel=0.12)
    # independent positions: the 4 views of an image (P(same) = 1/1024 per pair), and across images
    same = sum(a == b for image in boxes for a, b in itertools.combinations(image, 2))
    assert same <= 2, same
    assert len({b for image in boxes for b in image}) > 70
    # every view keeps the image's own colour outside its hole (the fill is 0 only there)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = views * std + mean
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1 + 1e-6


def test_several_cutout_holes_per_view(flat_folder):
    views = all_views(flat_folder, batch_size=8, num_views=2, image_size=32, cutout=6, cutout_holes=3)
    counts = torch.stack([holes(v).sum() for image in views for v in image])
    assert int(counts.max()) <= 3 * 36 and int(counts.min()) >= 9  # at worst one 3×3 corner
    assert float(counts.float().mean()) > 36  # more than one hole's worth on average
    assert sum(not is_rectangle(holes(v)) for image in views for v in image) > 10  # separate holes


def test_random_erasing_has_timms_area_and_aspect_and_differs_per_view(flat_folder):
    size = 64
    views = all_views(flat_folder, batch_size=8, num_views=4, image_size=size, random_erase=1.0)
    boxes = []
    for image in views:
        boxes.append([])
        for view in image:
            mask = holes(view)
            assert mask.any() and is_rectangle(mask)  # probability 1: one rectangle in every view
            top, bottom, left, right = box(mask)
            height, width = bottom - top + 1, right - left + 1
            assert 0.02 * 0.8 <= height * width / size ** 2 <= 1 / 3 * 1.15, (height, width)
            assert 0.3 * 0.8 <= height / width <= 1 / 0.3 * 1.25, (height, width)
            boxes[-1].append((top, bottom, left, right))
    assert sum(a == b for image in boxes for a, b in itertools.combinations(image, 2)) <= 2
    # the probability: about half of the views erased at 0.5, none at 0
    half = all_views(flat_folder, batch_size=8, num_views=4, image_size=32, random_erase=0.5)
    erased = np.array([[bool(holes(v).any()) for v in image] for image in half])
    assert 0.3 < erased.mean() < 0.7
    assert sum(row.all() or not row.any() for row in erased) <= 12  # each view flips its own coin (expect 3)
    assert not any(holes(v).any() for v in all_views(flat_folder, batch_size=8, num_views=1, image_size=32)[:, 0])


POLICIES = {"rand_augment": dict(rand_augment=[2, 9]), "auto_augment": dict(auto_augment=True),
            "trivial_augment": dict(trivial_augment=True)}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policies_change_views_independently_and_keep_shape_dtype_and_normalisation(image_folder, policy):
    """cifar recipe, no padding: without a policy every view is the eval view or its mirror, exactly;
    with one, most views are neither and the views of an image differ from each other."""
    common = dict(batch_size=8, image_size=24, num_threads=1, device="cpu", augment="cifar", pad=0, seed=1)
    loader = BatchAugmentLoader(image_folder, num_views=4, layout="grouped", **common, **POLICIES[policy])
    plain = BatchAugmentLoader(image_folder, num_views=4, layout="grouped", **common)
    indices = loader.batch_indices(0, 0)
    reference, _ = next(iter(EvalLoader(image_folder, batch_size=8, image_size=24, augment="cifar", indices=indices,
                                        num_threads=1, device="cpu")))
    views, labels = next(iter(loader))
    assert views.shape == (8, 4, 3, 24, 24) and views.dtype == torch.float32 and labels.shape == (8,)

    def unchanged(batch):
        return [torch.equal(v, reference[b]) or torch.equal(v, reference[b].flip(-1))
                for b in range(8) for v in batch[b]]

    assert all(unchanged(next(iter(plain))[0]))  # the control: flips only
    assert np.mean(unchanged(views)) < 0.5, policy
    same = sum(torch.equal(views[b, i], views[b, j]) for b in range(8) for i, j in itertools.combinations(range(4), 2))
    assert same <= 12, same  # of 48 pairs (two unchanged views with the same flip are equal)
    # normalisation kept: values in the range of normalised 0..255 pixels, per channel
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    pixels = views * std + mean
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6


OPTIONS = {"cutout": dict(cutout=8, cutout_holes=2), "random_erase": dict(random_erase=0.5),
           "rand_augment": dict(rand_augment=(2, 9)), "auto_augment": dict(auto_augment=True)}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_same_seed_same_batch_and_exact_resume_with_each_option(image_folder, option):
    opts = dict(batch_size=4, num_views=3, image_size=24, num_threads=1, device="cpu", seed=9, **OPTIONS[option])
    loader = BatchAugmentLoader(image_folder, **opts)
    batches, state = [], None
    for k, batch in enumerate(loader):
        batches.append(batch)
        if k == 1:
            state = loader.state_dict()
        if k == 2:
            break
    again = next(iter(BatchAugmentLoader(image_folder, **opts)))
    assert torch.equal(again[0], batches[0][0]) and torch.equal(again[1], batches[0][1])
    resumed = BatchAugmentLoader(image_folder, **opts)
    resumed.load_state_dict(state)
    images, labels = next(iter(resumed))
    assert torch.equal(images, batches[2][0]) and torch.equal(labels, batches[2][1])
    other = next(iter(BatchAugmentLoader(image_folder, **{**opts, "seed": 10})))
    assert not torch.equal(other[0], batches[0][0])


def test_a_state_saved_with_other_augmentation_settings_is_refused(image_folder):
    small = dict(batch_size=4, num_views=2, image_size=24, num_threads=1, device="cpu")
    state = BatchAugmentLoader(image_folder, cutout=8, **small).state_dict()
    with pytest.raises(LoaderStateError, match="cutout: saved 8, now 4"):
        BatchAugmentLoader(image_folder, cutout=4, **small).load_state_dict(state)
    with pytest.raises(LoaderStateError, match=r"rand_augment: saved None, now \[2, 9\]"):
        BatchAugmentLoader(image_folder, rand_augment=[2, 9], **small).load_state_dict(
            BatchAugmentLoader(image_folder, **small).state_dict())
    with pytest.raises(LoaderStateError, match="random_erase: saved 0.0, now 0.5"):
        BatchAugmentLoader(image_folder, random_erase=0.5, **small).load_state_dict(
            BatchAugmentLoader(image_folder, **small).state_dict())


@pytest.mark.parametrize("options, message", [
    (dict(trivial_augment=True, rand_augment=[2, 9]), "rand_augment: at most one of trivial_augment, rand_augment, "
                                                      "auto_augment may be on; got trivial_augment and rand_augment"),
    (dict(rand_augment=[2]), r"rand_augment: expected \[N, M\]"),
    (dict(rand_augment=[0, 9]), r"rand_augment: expected \[N, M\]"),
    (dict(rand_augment=[2, 31]), r"rand_augment: expected \[N, M\].*got \[2, 31\]"),
    (dict(cutout=-1), "cutout: expected a value >= 0"),
    (dict(cutout_holes=0), "cutout_holes: expected a value >= 1"),
    (dict(random_erase=1.5), "random_erase: expected 0.0 <= value <= 1.0"),
])
def test_bad_option_values_are_one_line_errors_naming_the_option(image_folder, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        BatchAugmentLoader(image_folder, batch_size=4, device="cpu", **options)
    assert "\n" not in str(info.value)


def test_an_empty_rand_augment_is_off(image_folder):
    for off in ([], None):
        loader = BatchAugmentLoader(image_folder, batch_size=4, device="cpu", rand_augment=off)
        assert loader.rand_augment is None and not loader.needs_conditionals
