"""Augmentation recipes as small DALI sub-graphs: one train *view* branch and one eval transform.

A recipe turns a decoded HWC uint8 image into a normalised float tensor. The train graph calls
``train_view`` M times on the same decoded image; each call creates new random operators with
no explicit ``seed=`` so DALI gives each its own seed (a shared seed, or one ``coin_flip`` node
reused across views, would make the views identical — see DESIGN.md).

Recipes:
- ``imagenet``: random resized crop (area ``[min_area, 1]``, aspect ``[3/4, 4/3]``) → optional
  colour jitter / TrivialAugment-Wide → flip → normalise. Eval: resize the shorter side to
  ``image_size / 0.875`` and centre-crop ``image_size``.
- ``cifar``: resize to ``image_size`` (a no-op when the image already has that size) → zero-pad
  ``pad`` pixels → random ``image_size`` crop on the integer grid → flip → normalise. Eval: the
  resize only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from dali_ba.config import AUGMENT_RECIPES, ConfigError

EVAL_CROP_FRACTION = 0.875  # the usual 224/256


@dataclass(frozen=True)
class AugmentSpec:
    """Everything a recipe needs; built from DataConfig or the loader's keyword arguments."""

    recipe: str = "imagenet"
    image_size: int = 224
    min_area: float = 0.08
    pad: int = 4
    color_jitter: float = 0.0
    trivial_augment: bool = False
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)  # on the 0..1 scale
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    dtype: str = "float32"
    channels_last: bool = False  # emit HWC so torch sees an NCHW tensor in channels_last memory

    def __post_init__(self) -> None:
        if self.recipe not in AUGMENT_RECIPES:
            raise ConfigError(f"augment: expected one of {', '.join(AUGMENT_RECIPES)}; got {self.recipe!r}")
        if self.image_size < 1:
            raise ConfigError(f"image_size: expected a value >= 1; got {self.image_size}")

    @property
    def needs_conditionals(self) -> bool:
        return self.trivial_augment


def _normalize(images, spec: AugmentSpec, mirror=None, crop=None, **crop_args):
    """crop_mirror_normalize: the last op of every branch (scale to 0..1, mean/std, layout, dtype)."""
    from nvidia.dali import fn, types

    kwargs = dict(crop_args)
    if crop is not None:
        kwargs["crop"] = crop
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if spec.dtype == "float16" else types.FLOAT,
        output_layout="HWC" if spec.channels_last else "CHW",
        mean=[m * 255.0 for m in spec.mean],
        std=[s * 255.0 for s in spec.std],
        **kwargs,
    )


def _colour(images, spec: AugmentSpec):
    """Per-view colour jitter and TrivialAugment (each call draws its own random parameters)."""
    from nvidia.dali import fn

    if spec.color_jitter > 0:
        j = spec.color_jitter
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=(max(0.0, 1 - j), 1 + j)),
            contrast=fn.random.uniform(range=(max(0.0, 1 - j), 1 + j)),
            saturation=fn.random.uniform(range=(max(0.0, 1 - j), 1 + j)),
        )
    if spec.trivial_augment:
        from nvidia.dali.auto_aug import trivial_augment

        images = trivial_augment.trivial_augment_wide(images)
    return images


def cifar_padded(images, spec: AugmentSpec):
    """Shared by all views: resize to image_size (identity if already) and zero-pad once."""
    from nvidia.dali import fn

    size = spec.image_size
    images = fn.resize(images, size=(size, size))
    if spec.pad == 0:
        return images
    padded = size + 2 * spec.pad
    return fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad", fill_values=0)


def train_view(images, spec: AugmentSpec, shared=None):
    """One independently augmented view of ``images`` (a DALI DataNode, HWC uint8).

    ``shared`` is what ``prepare_shared`` returned: work common to all views (done once).
    """
    from nvidia.dali import fn

    flip = fn.random.coin_flip()  # a new node per view: a shared one would flip all views alike
    size = spec.image_size
    if spec.recipe == "imagenet":
        crop = fn.random_resized_crop(
            images, size=(size, size), random_area=(spec.min_area, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
        )
        return _normalize(_colour(crop, spec), spec, mirror=flip)
    # cifar: integer offsets in [0, 2*pad], uniform, as torchvision's RandomCrop(padding=pad)
    base = shared if shared is not None else cifar_padded(images, spec)
    if spec.pad == 0:
        return _normalize(base, spec, mirror=flip)
    positions = [k / (2 * spec.pad) for k in range(2 * spec.pad + 1)]
    return _normalize(
        base,
        spec,
        mirror=flip,
        crop=(size, size),
        crop_pos_x=fn.random.uniform(values=positions),
        crop_pos_y=fn.random.uniform(values=positions),
    )


def prepare_shared(images, spec: AugmentSpec):
    """Deterministic work every view starts from, done once per image (cifar: resize + pad)."""
    return cifar_padded(images, spec) if spec.recipe == "cifar" else None


def eval_view(images, spec: AugmentSpec):
    """The deterministic eval transform that matches the train recipe."""
    from nvidia.dali import fn

    size = spec.image_size
    if spec.recipe == "imagenet":
        resized = fn.resize(images, resize_shorter=round(size / EVAL_CROP_FRACTION))
        return _normalize(resized, spec, crop=(size, size))
    return _normalize(fn.resize(images, size=(size, size)), spec)
