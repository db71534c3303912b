"""Augmentation recipes as small DALI sub-graphs: one train *view* branch and one eval transform.

A recipe turns a decoded HWC uint8 image into a normalised float tensor. The train graph calls
``train_views`` with the same decoded image M times; each view creates new random operators with
no explicit ``seed=`` so DALI gives each its own seed (a shared seed, or one ``coin_flip`` node
reused across views, would make the views identical — see DESIGN.md).

With M > 1 each view stays uint8 until the end (crop/resize → colour → flip), the M crops are
stacked (``[M, H, W, C]``) and one ``crop_mirror_normalize`` writes the float ``[M, C, H, W]``
result, instead of M float views copied again by a float ``stack``. DALI's CPU ``stack`` copies
element by element, so the uint8 crops are stacked as 64-bit words (``reinterpret`` there and
back: no copy, the same bytes). Measured with ``perf`` on the 2-core CPU machine at M=4: the
normalise + stack share of the pipeline's CPU time fell from ~16% to ~10%. Same operators, same
random draws per view, same distribution (tests/test_bench.py checks the values against M
ordinary branches); with M = 1 the graph is exactly ``train_view``.

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


def _normalize(images, spec: AugmentSpec, mirror=None, crop=None, frames: bool = False, **crop_args):
    """crop_mirror_normalize: the last op of every branch (scale to 0..1, mean/std, layout, dtype).

    ``frames``: the input is a stack of views ``[M, H, W, C]`` (layout FHWC).
    """
    from nvidia.dali import fn, types

    kwargs = dict(crop_args)
    if crop is not None:
        kwargs["crop"] = crop
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if spec.dtype == "float16" else types.FLOAT,
        output_layout=("F" if frames else "") + ("HWC" if spec.channels_last else "CHW"),
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
        return _normalize(_colour(_random_resized_crop(images, spec), spec), spec, mirror=flip)
    # cifar: integer offsets in [0, 2*pad], uniform, as torchvision's RandomCrop(padding=pad)
    base = shared if shared is not None else cifar_padded(images, spec)
    if spec.pad == 0:
        return _normalize(base, spec, mirror=flip)
    x, y = _cifar_offsets(spec)
    return _normalize(base, spec, mirror=flip, crop=(size, size), crop_pos_x=x, crop_pos_y=y)


def train_views(images: Sequence, spec: AugmentSpec, shared: Optional[Sequence] = None):
    """M views, view i from ``images[i]`` (the same decoded node M times in the fused graph).

    M = 1: ``train_view`` (``[C, H, W]``). M > 1: ``[M, C, H, W]`` (``[M, H, W, C]`` with
    ``channels_last``): uint8 view crops, stacked, normalised once (see the module docstring).
    """
    from nvidia.dali import fn

    shared = list(shared) if shared is not None else [None] * len(images)
    if len(images) == 1:
        return train_view(images[0], spec, shared[0])
    crops = [_view_uint8(image, spec, base) for image, base in zip(images, shared)]
    return _normalize(_stack_uint8(crops, spec.image_size), spec, frames=True)


def _stack_uint8(crops: Sequence, size: int):
    """Stack uint8 ``[size, size, 3]`` crops into ``[M, size, size, 3]`` (FHWC), copying them as
    the widest machine words that divide a crop's bytes (see the module docstring)."""
    from nvidia.dali import fn, types

    nbytes = size * size * 3
    word, dtype = next((w, t) for w, t in ((8, types.INT64), (4, types.INT32), (2, types.INT16), (1, types.UINT8))
                       if nbytes % w == 0)
    words = [fn.reinterpret(crop, dtype=dtype, shape=[nbytes // word]) for crop in crops]
    return fn.reinterpret(fn.stack(*words), dtype=types.UINT8, shape=[len(crops), size, size, 3], layout="FHWC")


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


def _view_uint8(images, spec: AugmentSpec, shared=None):
    """One view up to (not including) the normalisation: crop → colour → flip, all uint8 HWC."""
    from nvidia.dali import fn

    size = spec.image_size
    if spec.recipe == "imagenet":
        view = _colour(_random_resized_crop(images, spec), spec)
    else:
        view = shared if shared is not None else cifar_padded(images, spec)
        if spec.pad > 0:
            x, y = _cifar_offsets(spec)
            view = fn.crop(view, crop=(size, size), crop_pos_x=x, crop_pos_y=y)
    return fn.flip(view, horizontal=fn.random.coin_flip(), vertical=0)


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
