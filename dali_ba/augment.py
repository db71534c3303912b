"""Augmentation recipes as small DALI sub-graphs: one train *view* branch and one eval transform.

A recipe turns a decoded HWC uint8 image into a normalised float tensor. The train graph calls
``train_views`` on one decoded image: each of the M views creates its own random operators with no
explicit ``seed=``, so DALI seeds each one differently (a shared seed, or one ``coin_flip`` node
reused across views, would make the views identical). Each view is crop/resize → colour → one
``crop_mirror_normalize`` that also flips, and is its own pipeline output; the loader copies the M
outputs into one ``[B, M, C, H, W]`` tensor.

Recipes:
- ``imagenet``: random resized crop (area ``[min_area, 1]``, aspect ``[3/4, 4/3]``) → optional
  colour jitter / TrivialAugment-Wide → flip → normalise. Eval: resize the shorter side to
  ``image_size / 0.875`` and centre-crop ``image_size``.
- ``cifar``: resize to ``image_size`` (a no-op when the image already has that size) → zero-pad
  ``pad`` pixels → random ``image_size`` crop on the integer grid → flip → normalise. Eval: the
  resize only.

The functions read the recipe's settings from ``spec``, the loader's options
(``dali_ba.options.PipelineOptions``). ``antialias=False`` resizes imagenet crops without the
antialiasing filter: less CPU, but downscaled crops alias (an explicit approximation).
"""
from __future__ import annotations

from dali_ba.options import PipelineOptions

EVAL_CROP_FRACTION = 0.875  # the usual 224/256


def normalize(images, spec: PipelineOptions, mirror=None, crop=None, **crop_args):
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


def colour(images, spec: PipelineOptions):
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


def train_view(shared, spec: PipelineOptions):
    """One independently augmented view of ``shared`` (what ``prepare_shared`` returned, a DALI
    DataNode, HWC uint8): ``[C, H, W]`` float (``[H, W, C]`` with ``channels_last``)."""
    from nvidia.dali import fn

    size = spec.image_size
    crop_args = {}
    if spec.augment == "imagenet":
        extra = {} if spec.antialias else {"antialias": False}
        view = fn.random_resized_crop(shared, size=(size, size), random_area=(spec.min_area, 1.0),
                                      random_aspect_ratio=(3 / 4, 4 / 3), **extra)
        view = colour(view, spec)
    else:  # cifar: integer offsets in [0, 2*pad], uniform, as torchvision's RandomCrop(padding=pad)
        view = shared
        if spec.pad > 0:
            positions = [k / (2 * spec.pad) for k in range(2 * spec.pad + 1)]
            crop_args = dict(crop=(size, size), crop_pos_x=fn.random.uniform(values=positions),
                             crop_pos_y=fn.random.uniform(values=positions))
    flip = fn.random.coin_flip()  # a new node per view: one shared node would flip all views alike
    return normalize(view, spec, mirror=flip, **crop_args)


def train_views(shared, spec: PipelineOptions, num_views: int) -> list:
    """M independently augmented views of the same decoded image (one list entry per view)."""
    return [train_view(shared, spec) for _ in range(num_views)]


def eval_view(images, spec: PipelineOptions):
    """The deterministic eval transform that matches the train recipe."""
    from nvidia.dali import fn

    size = spec.image_size
    if spec.augment == "imagenet":
        resized = fn.resize(images, resize_shorter=round(size / EVAL_CROP_FRACTION))
        return normalize(resized, spec, crop=(size, size))
    return normalize(fn.resize(images, size=(size, size)), spec)
