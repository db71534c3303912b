"""Augmentation recipes as small DALI sub-graphs: one train *view* branch and one eval transform.

A recipe turns a decoded HWC uint8 image into a normalised float tensor. The train graph calls
``train_views`` with the same decoded image M times; each view creates new random operators with
no explicit ``seed=`` so DALI gives each its own seed (a shared seed, or one ``coin_flip`` node
reused across views, would make the views identical — see DESIGN.md).

Each view is its own branch, crop/resize → colour → one ``crop_mirror_normalize`` that also does
the flip, and is its own pipeline output: the loader copies the M outputs straight into one
``[B, M, C, H, W]`` tensor (the copy it makes anyway), so no DALI op stacks them. Measured on the
2-core CPU machine at M=4, B=64 against the previous graph (uint8 crops, ``fn.flip``, a stack, one
normalise; the loader then copied the stack with torch): 6.2 against 6.7–6.8 CPU ms per image,
1.06–1.10× the images/s (benchmarks/README.md), and the very same views.

``antialias=False`` (off by default) resizes the crops without the antialiasing filter: ~20%
less CPU at M=4, but downscaled crops alias (moiré, jagged edges) — an explicit approximation.

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
from typing import Optional, Sequence, Tuple

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
    antialias: bool = True  # imagenet crops: False = faster, aliased downscaling (an approximation)

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
    """One independently augmented view of ``images`` (a DALI DataNode, HWC uint8): ``[C, H, W]``
    float (``[H, W, C]`` with ``channels_last``).

    ``shared`` is what ``prepare_shared`` returned: work common to all views (done once).
    """
    return _view(images, spec, shared, flip_first=True)


def train_views(images: Sequence, spec: AugmentSpec, shared: Optional[Sequence] = None) -> list:
    """M views, view i from ``images[i]`` (the same decoded node M times in the fused graph): a
    list of M outputs, each ``[C, H, W]`` (see the module docstring for why they stay apart)."""
    shared = list(shared) if shared is not None else [None] * len(images)
    if len(images) == 1:
        return [train_view(images[0], spec, shared[0])]
    return [_view(image, spec, base, flip_first=False) for image, base in zip(images, shared)]


def _view(images, spec: AugmentSpec, shared, flip_first: bool):
    """crop/resize → colour → normalise with a random mirror.

    ``flip_first``: create the flip coin before the crop's random operators (the single-view
    order) or after them (the multi-view order). DALI seeds random operators in the order they are
    created, and these two orders reproduce the views of earlier dali-ba versions bit for bit
    (M = 1 and M > 1 had different graphs), so recorded results stay reproducible.
    """
    from nvidia.dali import fn

    flip = fn.random.coin_flip() if flip_first else None  # a new node per view: shared, all views flip alike
    size = spec.image_size
    crop_args = {}
    if spec.recipe == "imagenet":
        view = _colour(_random_resized_crop(images, spec), spec)
    else:  # cifar: integer offsets in [0, 2*pad], uniform, as torchvision's RandomCrop(padding=pad)
        view = shared if shared is not None else cifar_padded(images, spec)
        if spec.pad > 0:
            x, y = _cifar_offsets(spec)
            crop_args = dict(crop=(size, size), crop_pos_x=x, crop_pos_y=y)
    if flip is None:
        flip = fn.random.coin_flip()  # the multi-view order: after the crop's operators
    return _normalize(view, spec, mirror=flip, **crop_args)


def _random_resized_crop(images, spec: AugmentSpec):
    from nvidia.dali import fn

    size = spec.image_size
    extra = {} if spec.antialias else {"antialias": False}
    return fn.random_resized_crop(
        images, size=(size, size), random_area=(spec.min_area, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), **extra
    )


def _cifar_offsets(spec: AugmentSpec):
    """Uniform integer offsets in [0, 2*pad] as normalised crop positions (a new pair per call)."""
    from nvidia.dali import fn

    positions = [k / (2 * spec.pad) for k in range(2 * spec.pad + 1)]
    return fn.random.uniform(values=positions), fn.random.uniform(values=positions)


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
