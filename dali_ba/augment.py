"""Augmentation recipes as small DALI sub-graphs: one train *view* branch and one eval transform.

A recipe turns a decoded HWC uint8 image into a normalised float tensor. The train graph calls
``train_views`` on one decoded image: each of the M views creates its own random operators with no
explicit ``seed=``, so DALI seeds each one differently (a shared seed, or one ``coin_flip`` node
reused across views, would make the views identical). Each view is crop/resize → colour and
automatic augmentation → one ``crop_mirror_normalize`` that also flips → occlusions, and is its
own pipeline output; the loader copies the M outputs into one ``[B, M, C, H, W]`` tensor.

Recipes:
- ``imagenet``: random resized crop (area ``[min_area, 1]``, aspect ``[3/4, 4/3]``) → per-view
  extras → flip → normalise. Eval: resize the shorter side to ``image_size / 0.875`` and
  centre-crop ``image_size``.
- ``cifar``: resize to ``image_size`` (a no-op when the image already has that size) → zero-pad
  ``pad`` pixels → random ``image_size`` crop on the integer grid → per-view extras → flip →
  normalise. Eval: the resize only.

Per-view extras, each drawn independently for every view (both recipes, CPU and GPU alike):
- ``color_jitter``; then at most one automatic policy of ``nvidia.dali.auto_aug`` on the uint8
  crop: ``trivial_augment`` (TrivialAugment-Wide), ``rand_augment`` ([N, M]) or ``auto_augment``
  (the ImageNet policy). Their translations are relative to the crop (100/224 of its side for
  RandAugment and AutoAugment, as at 224 px), so they suit CIFAR-sized images too.
- Occlusions on the normalised output, filled with 0 (the mean colour), as in the Cutout code the
  batch-augmentation authors use and timm's ``RandomErasing(mode="const")``: ``cutout``: holes of
  ``cutout`` pixels centred uniformly on the image and clipped at its border (DeVries & Taylor);
  ``random_erase``: with that probability one rectangle of area ``[0.02, 1/3]`` of the image and
  log-uniform aspect ``[0.3, 1/0.3]`` (timm's defaults), placed where it fits. timm redraws (up
  to 10 times) a rectangle as large as the image; here it is clipped to the image side (about 0.5%
  of the draws).
Occlusions are training regularisers: test-time views (``EvalLoader(views=k)``) leave them out.

The functions read the recipe's settings from ``spec``, the loader's options
(``dali_ba.options.PipelineOptions``). ``antialias=False`` resizes imagenet crops without the
antialiasing filter: less CPU, but downscaled crops alias (an explicit approximation).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

from dali_ba.options import PipelineOptions

EVAL_CROP_FRACTION = 0.875  # the usual 224/256
ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing: fraction of the image
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def normalize(images, spec: PipelineOptions, mirror=None, crop=None, **crop_args):
    """crop_mirror_normalize: scale to 0..1, mean/std, layout, dtype (and the view's flip)."""
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


def has_extras(spec: PipelineOptions) -> bool:
    """Whether a view gets colour jitter or an automatic policy (they work on the uint8 crop)."""
    return spec.color_jitter > 0 or spec.needs_conditionals


def extras(images, spec: PipelineOptions):
    """Per-view colour jitter, then the automatic policy if any (each call draws its own parameters)."""
    from nvidia.dali import fn

    if spec.color_jitter > 0:
        j = spec.color_jitter
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=(max(0.0, 1 - j), 1 + j)),
            contrast=fn.random.uniform(range=(max(0.0, 1 - j), 1 + j)),
            saturation=fn.random.uniform(range=(max(0.0, 1 - j), 1 + j)),
        )
    if not spec.needs_conditionals:
        return images
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    shape = (spec.image_size, spec.image_size)
    with _without_dalis_own_deprecations():
        if spec.trivial_augment:
            return trivial_augment.trivial_augment_wide(images, shape=shape)
        if spec.rand_augment:
            n, m = spec.rand_augment
            return rand_augment.rand_augment(images, n=n, m=m, shape=shape)
        return auto_augment.auto_augment_image_net(images, shape=shape)


@contextmanager
def _without_dalis_own_deprecations():
    """nvidia.dali.auto_aug builds ops DALI 2.4 itself deprecated (``fn.experimental.equalize``…) and
    DALI forces those warnings on, two per view at every graph build: keep them off the console."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if not (issubclass(category, DeprecationWarning) and "nvidia.dali.fn.experimental." in str(message)):
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _cutout(view, spec: PipelineOptions):
    """``cutout_holes`` squares of side ``cutout``, centred on uniform pixels, clipped at the border."""
    from nvidia.dali import fn

    side, holes = spec.cutout, spec.cutout_holes
    centres = fn.random.uniform(values=[float(k) for k in range(spec.image_size)], shape=2 * holes)  # (y, x)…
    return fn.erase(view, anchor=centres - float(side // 2), shape=[float(side)] * (2 * holes), axis_names="HW",
                    fill_value=0.0)


def _random_erase(view, spec: PipelineOptions):
    """timm's RandomErasing (one rectangle, constant fill): its probability, area and aspect."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    size = float(spec.image_size)
    area = fn.random.uniform(range=ERASE_AREA) * (size * size)
    aspect = dmath.exp(fn.random.uniform(range=ERASE_LOG_ASPECT))  # height / width
    height = dmath.min(dmath.floor(dmath.sqrt(area * aspect) + 0.5), size)
    width = dmath.min(dmath.floor(dmath.sqrt(area / aspect) + 0.5), size)
    top = dmath.floor(fn.random.uniform(range=(0.0, 1.0)) * (size - height + 1.0))
    left = dmath.floor(fn.random.uniform(range=(0.0, 1.0)) * (size - width + 1.0))
    erased = fn.random.coin_flip(probability=spec.random_erase)  # 0: an empty rectangle, nothing erased
    return fn.erase(view, anchor=fn.stack(top, left), shape=fn.stack(height, width) * erased, axis_names="HW",
                    fill_value=0.0)


def occlude(view, spec: PipelineOptions):
    """Cutout, then random erasing, on a normalised view (fill 0 = the mean colour)."""
    if spec.cutout > 0:
        view = _cutout(view, spec)
    if spec.random_erase > 0:
        view = _random_erase(view, spec)
    return view


def prepare_shared(images, spec: PipelineOptions):
    """Deterministic work every view starts from, done once per image (cifar: resize + zero-pad)."""
    from nvidia.dali import fn

    if spec.augment != "cifar":
        return images
    size = spec.image_size
    images = fn.resize(images, size=(size, size))
    if spec.pad == 0:
        return images
    padded = size + 2 * spec.pad
    return fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad", fill_values=0)


def train_view(shared, spec: PipelineOptions, occlusions: bool = True):
    """One independently augmented view of ``shared`` (what ``prepare_shared`` returned, a DALI
    DataNode, HWC uint8): ``[C, H, W]`` float (``[H, W, C]`` with ``channels_last``).
    ``occlusions=False``: without cutout and random erasing (test-time views)."""
    from nvidia.dali import fn

    size = spec.image_size
    crop_args = {}
    if spec.augment == "imagenet":
        extra = {} if spec.antialias else {"antialias": False}
        view = fn.random_resized_crop(shared, size=(size, size), random_area=(spec.min_area, 1.0),
                                      random_aspect_ratio=(3 / 4, 4 / 3), **extra)
    else:  # cifar: integer offsets in [0, 2*pad], uniform, as torchvision's RandomCrop(padding=pad)
        view = shared
        if spec.pad > 0:
            positions = [k / (2 * spec.pad) for k in range(2 * spec.pad + 1)]
            crop_args = dict(crop=(size, size), crop_pos_x=fn.random.uniform(values=positions),
                             crop_pos_y=fn.random.uniform(values=positions))
            if has_extras(spec):  # the extras work on the crop: crop first (else normalise crops)
                view, crop_args = fn.crop(view, **crop_args), {}
    if has_extras(spec):
        view = extras(view, spec)
    flip = fn.random.coin_flip()  # a new node per view: one shared node would flip all views alike
    view = normalize(view, spec, mirror=flip, **crop_args)
    return occlude(view, spec) if occlusions else view


def train_views(shared, spec: PipelineOptions, num_views: int, occlusions: bool = True) -> list:
    """M independently augmented views of the same decoded image (one list entry per view)."""
    return [train_view(shared, spec, occlusions) for _ in range(num_views)]


def eval_view(images, spec: PipelineOptions):
    """The deterministic eval transform that matches the train recipe."""
    from nvidia.dali import fn

    size = spec.image_size
    if spec.augment == "imagenet":
        resized = fn.resize(images, resize_shorter=round(size / EVAL_CROP_FRACTION))
        return normalize(resized, spec, crop=(size, size))
    return normalize(fn.resize(images, size=(size, size)), spec)
