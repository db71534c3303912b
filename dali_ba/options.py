"""The loaders' options: names, types, defaults and checks, written once.

``PipelineOptions`` is the base of both loaders (they are dataclasses, so these fields are their
explicit, typed keyword arguments). ``check_options`` validates any object that has some of these
attributes: the loaders, and ``DataConfig`` (the ``data:`` section of a YAML recipe, which uses the
same names) with a ``data.`` prefix in its messages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from dali_ba.errors import ConfigError
from dali_ba.packed import PACKED_SHUFFLES

AUGMENT_RECIPES = ("imagenet", "cifar")
DEVICES = ("auto", "cpu", "cuda")
DECODE_DEVICES = ("auto", "gpu", "cpu")
DTYPES = ("float32", "float16")
RAND_AUGMENT_MAX_MAGNITUDE = 30  # DALI's rand_augment: 31 magnitude bins
POLICIES = ("trivial_augment", "rand_augment", "auto_augment")  # automatic augmentation: at most one

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # on the 0..1 scale
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(eq=False, kw_only=True)
class PipelineOptions:
    """What both loaders take besides ``root``: what to read, how to decode, how to augment."""

    batch_size: int = 64  # B: unique images per step per rank (eval: per batch)
    image_size: int = 224  # output height = width
    augment: str = "imagenet"  # recipe: "imagenet" or "cifar" (dali_ba.augment)
    seed: int = 0  # run seed; each rank derives its own augmentation seed
    shard_id: Optional[int] = None  # default: torch.distributed's global rank
    num_shards: Optional[int] = None  # default: torch.distributed's world size
    file_list: Optional[str] = None  # "relative/path label" lines under root, instead of a folder scan
    device: str = "auto"  # "cuda": augment (and decode) on the GPU; "cpu": all-CPU graph; "auto"
    device_id: Optional[int] = None  # CUDA device; default LOCAL_RANK under torch.distributed
    decode_device: str = "auto"  # with cuda: "gpu" (nvJPEG/HW decoder), "cpu" (tiny JPEGs); auto = gpu
    num_threads: int = 2  # DALI CPU threads
    prefetch: int = 2  # DALI prefetch queue depth
    hw_decoder_load: float = 0.65  # GPU: share of JPEGs given to the hardware decoder
    preallocate_width_hint: int = 0  # GPU: decoder buffers sized up front (0 = grow as needed)
    preallocate_height_hint: int = 0
    dtype: str = "float32"  # or "float16"
    channels_last: bool = False  # NCHW tensors in channels-last memory (the graph emits HWC)
    min_area: float = 0.08  # imagenet: random resized crop area range [min_area, 1]
    pad: int = 4  # cifar: zero padding before the random crop
    color_jitter: float = 0.0  # brightness/contrast/saturation strength per view
    trivial_augment: bool = False  # TrivialAugment-Wide per view (at most one of the three policies)
    rand_augment: Optional[Sequence[int]] = None  # RandAugment [N, M] per view: N ops of magnitude M (0..30)
    auto_augment: bool = False  # AutoAugment, the ImageNet policy, per view
    cutout: int = 0  # square hole side in pixels after normalisation, filled with 0 (0 = off)
    cutout_holes: int = 1  # holes per view (each at its own random centre)
    random_erase: float = 0.0  # probability of erasing a random rectangle per view (timm's ranges)
    mean: Sequence[float] = IMAGENET_MEAN  # normalisation, 0..1 scale
    std: Sequence[float] = IMAGENET_STD
    antialias: bool = True  # imagenet crops: False = faster, aliased downscaling (an approximation)
    split: Optional[str] = None  # packed dataset: the split to read (default: train, or val for EvalLoader)
    packed_shuffle: str = "buffer"  # packed dataset: "buffer" (sequential reads) or "global" (see dali_ba.packed)
    shuffle_buffer: int = 1024  # packed dataset, "buffer": samples DALI draws from at random

    @property
    def needs_conditionals(self) -> bool:
        """Per-view automatic augmentation (nvidia.dali.auto_aug) needs DALI's conditionals."""
        return bool(active_policies(self))

    @property
    def gpu_decode(self) -> bool:
        """Decode with nvJPEG / the hardware decoder (``mixed``)."""
        return self.device == "cuda" and self.decode_device != "cpu"


def active_policies(options: Any) -> Tuple[str, ...]:
    """The automatic augmentation policies ``options`` turns on (an empty ``rand_augment`` is off)."""
    return tuple(name for name in POLICIES if getattr(options, name, None))


# The options that shape a pipeline's graph (and so its DALI checkpoints): a state saved by one
# graph must not be restored into another (DALI calls that undefined behaviour).
GRAPH_OPTIONS = ("image_size", "augment", "device", "decode_device", "hw_decoder_load", "preallocate_width_hint",
                 "preallocate_height_hint", "dtype", "channels_last", "min_area", "pad", "color_jitter",
                 "trivial_augment", "rand_augment", "auto_augment", "cutout", "cutout_holes", "random_erase",
                 "mean", "std", "antialias")


def graph_settings(options: "PipelineOptions", **extra: Any) -> Dict[str, Any]:
    """The values of ``GRAPH_OPTIONS`` (lists for sequences), plus ``extra`` graph parameters."""
    out = {name: getattr(options, name) for name in GRAPH_OPTIONS}
    out.update(extra)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# What a state saved before an option existed was built with: the option's default (off).


def _between(low: float, high: float, low_open: bool = False) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        ok = (low < value if low_open else low <= value) and value <= high
        return None if ok else f"expected {low} {'<' if low_open else '<='} value <= {high}"
    return check


def _at_least(low: float) -> Callable[[Any], Optional[str]]:
    return lambda value: None if value >= low else f"expected a value >= {low}"


def _one_of(choices: Sequence[str]) -> Callable[[Any], Optional[str]]:
    return lambda value: None if value in choices else f"expected one of {', '.join(choices)}"


def _rand_augment(value: Any) -> Optional[str]:
    if len(value) == 0:
        return None
    ints = len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if ints and value[0] >= 1 and 0 <= value[1] <= RAND_AUGMENT_MAX_MAGNITUDE:
        return None
    return f"expected [N, M]: N >= 1 ops of magnitude 0 <= M <= {RAND_AUGMENT_MAX_MAGNITUDE} (empty or null: off)"


def _rgb(value: Any) -> Optional[str]:
    return None if len(value) == 3 else "expected 3 values (RGB)"


def _rgb_positive(value: Any) -> Optional[str]:
    return _rgb(value) or (None if min(value) > 0 else "expected positive values")


CHECKS: Dict[str, Callable[[Any], Optional[str]]] = {
    "batch_size": _at_least(1), "num_views": _at_least(1), "views": _at_least(1), "image_size": _at_least(1),
    "augment": _one_of(AUGMENT_RECIPES), "dtype": _one_of(DTYPES), "device": _one_of(DEVICES),
    "decode_device": _one_of(DECODE_DEVICES), "num_threads": _at_least(1), "prefetch": _at_least(1),
    "hw_decoder_load": _between(0.0, 1.0), "preallocate_width_hint": _at_least(0),
    "preallocate_height_hint": _at_least(0), "min_area": _between(0.0, 1.0, low_open=True), "pad": _at_least(0),
    "color_jitter": _at_least(0.0), "mean": _rgb, "std": _rgb_positive, "seed": _at_least(0),
    "packed_shuffle": _one_of(PACKED_SHUFFLES), "shuffle_buffer": _at_least(1), "global_batch_size": _at_least(0),
    "rand_augment": _rand_augment, "cutout": _at_least(0), "cutout_holes": _at_least(1),
    "random_erase": _between(0.0, 1.0),
}


def check_options(options: Any, prefix: str = "") -> None:
    """ConfigError naming the first option of ``options`` (an object) with a bad value."""
    check_limits(options, prefix)
    for name, check in CHECKS.items():
        value = getattr(options, name, None)
        if value is None:
            continue
        problem = check(value)
        if problem:
            shown = list(value) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{prefix}{name}: {problem}; got {shown!r}")
    policies = active_policies(options)
    if len(policies) > 1:
        raise ConfigError(f"{prefix}{policies[1]}: at most one of trivial_augment, rand_augment, auto_augment may be "
                          f"on; got {' and '.join(prefix + p for p in policies)}")


# Upper bounds, where a larger value fails outside Python: DALI aborts the process when the system
# refuses a thread (100,000 threads here), and every prefetched batch holds B·M images in memory.
UPPER_LIMITS = {"num_threads": 1024, "prefetch": 64}


def check_limits(options: Any, prefix: str = "") -> None:
    """ConfigError for a number that is not finite (NaN, inf) or above ``UPPER_LIMITS``."""
    import math

    for name in getattr(options, "__dataclass_fields__", None) or vars(options):
        value = getattr(options, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{prefix}{name}: expected a finite number; got {shown!r}")
    for name, high in UPPER_LIMITS.items():
        value = getattr(options, name, None)
        if value is not None and value > high:
            raise ConfigError(f"{prefix}{name}: expected a value <= {high}; got {value!r}")
