"""Typed, validated, frozen run configuration.

One YAML file describes one run (see ``pipelines/``). ``load_config`` merges it over the
dataclass defaults below, applies dotted ``key=value`` overrides, rejects unknown keys and
wrong types (OmegaConf structured configs), then checks values in ``__post_init__``. Every
error is a :class:`ConfigError` whose message names the file, the key and what was expected.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dali_ba.errors import UserError

AUGMENT_RECIPES = ("imagenet", "cifar")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16")
LR_SCALING = ("none", "linear", "sqrt")
SCHEDULES = ("step", "cosine")
WARMUPS = ("linear", "legw")
AMP_MODES = ("off", "bf16", "fp16")


class ConfigError(UserError, ValueError):
    """A config file, key or value is wrong; the message says which and what was expected."""


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: expected a value >= {low}; got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """What the DALI pipeline reads and how it augments (see dali_ba.augment)."""

    train_root: str = "data/fashion-mnist/train"  # ImageFolder root: root/<class>/<image>
    val_root: Optional[str] = None
    train_list: Optional[str] = None  # optional file list ("relative/path label" lines) under train_root
    batch_size: int = 64  # B: unique images per step per rank
    num_views: int = 4  # M: augmented views of each image in the same batch
    image_size: int = 224
    augment: str = "imagenet"
    min_area: float = 0.08  # imagenet: random_resized_crop area range [min_area, 1]
    pad: int = 4  # cifar: pixels of zero padding before the random crop
    color_jitter: float = 0.0  # imagenet: brightness/contrast/saturation strength per view, 0 = off
    trivial_augment: bool = False  # imagenet: TrivialAugment-Wide per view
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    num_threads: int = 2  # DALI CPU threads per pipeline (per rank)
    prefetch: int = 2  # DALI prefetch queue depth
    hw_decoder_load: float = 0.65  # GPU only: share of JPEG decoding given to the HW decoder
    preallocate_width_hint: int = 0  # GPU only: stop decode buffers growing to the largest image
    preallocate_height_hint: int = 0

    def __post_init__(self) -> None:
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.num_views", self.num_views, 1)
        _at_least("data.image_size", self.image_size, 1)
        _choice("data.augment", self.augment, AUGMENT_RECIPES)
        _choice("data.dtype", self.dtype, DTYPES)
        _choice("data.device", self.device, DEVICES)
        _at_least("data.num_threads", self.num_threads, 1)
        _at_least("data.prefetch", self.prefetch, 1)
        _at_least("data.pad", self.pad, 0)
        _at_least("data.color_jitter", self.color_jitter, 0.0)
        if not 0.0 < self.min_area <= 1.0:
            raise ConfigError(f"data.min_area: expected 0 < value <= 1; got {self.min_area!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f"data.hw_decoder_load: expected 0 <= value <= 1; got {self.hw_decoder_load!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("data.mean and data.std: expected 3 values each (RGB)")
        if min(self.std) <= 0:
            raise ConfigError(f"data.std: expected positive values; got {list(self.std)}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"  # torchvision resnet18/34/50/101, cifar resnet20/44/56, resnet8, smallnet
    num_classes: int = 0  # 0: the number of class folders in data.train_root


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1  # at optim.reference_batch; scaled by optim.lr_scaling
    lr_scaling: str = "none"
    reference_batch: int = 256  # global batch (unique images) at which optim.lr is right
    scale_with_views: bool = False  # count M·B samples (not B images) when scaling the LR
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_bn_bias: bool = False  # exclude BatchNorm weights and biases from weight decay
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _at_least("optim.lr", self.lr, 0.0)
        _choice("optim.lr_scaling", self.lr_scaling, LR_SCALING)
        _at_least("optim.reference_batch", self.reference_batch, 1)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"optim.label_smoothing: expected 0 <= value < 1; got {self.label_smoothing!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"
    milestones: List[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])  # epochs (step)
    gamma: float = 0.1  # step: LR factor at each milestone
    min_lr: float = 0.0  # cosine: final LR
    warmup_epochs: float = 0.0
    warmup: str = "linear"

    def __post_init__(self) -> None:
        _choice("schedule.kind", self.kind, SCHEDULES)
        _choice("schedule.warmup", self.warmup, WARMUPS)
        _at_least("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"schedule.milestones: expected increasing epochs; got {list(self.milestones)}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 2.0  # defines the LR schedule
    max_steps: int = 0  # stop at this global step without changing the schedule; 0 = no limit
    seed: int = 0
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto | none | a run directory | a checkpoint file
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False  # torch.compile the training step and the evaluation (diagnostic probes stay eager)
    view_chunks: int = 1  # split the M·B batch into view-major chunks with gradient accumulation
    eval_every: int = 0  # steps; 0 = at the end of every epoch
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch
    log_every: int = 1
    tensorboard: bool = False
    dist_timeout_s: int = 600  # a dead rank brings the others down after this many seconds

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs: expected a value > 0; got {self.epochs!r}")
        for key in ("max_steps", "eval_every", "checkpoint_every"):
            _at_least(f"train.{key}", getattr(self, key), 0)
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.view_chunks", self.view_chunks, 1)
        _at_least("train.dist_timeout_s", self.dist_timeout_s, 1)
        _choice("train.amp", self.amp, AMP_MODES)


@dataclass(frozen=True)
class EvalConfig:
    views: int = 1  # >1: test-time averaging over this many augmented views
    batch_size: int = 0  # 0: data.batch_size

    def __post_init__(self) -> None:
        _at_least("eval.views", self.views, 1)
        _at_least("eval.batch_size", self.batch_size, 0)


@dataclass(frozen=True)
class DiagnosticsConfig:
    every: int = 0  # steps between gradient-noise measurements; 0 = off

    def __post_init__(self) -> None:
        _at_least("diagnostics.every", self.every, 0)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def __post_init__(self) -> None:
        if self.data.num_views % self.train.view_chunks:
            raise ConfigError(
                f"train.view_chunks: expected a divisor of data.num_views={self.data.num_views}; "
                f"got {self.train.view_chunks}"
            )


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in" in first_line and key:
        return f"{key}: unknown key (check the spelling; see dali_ba/config.py for the keys)"
    return f"{key}: {first_line}" if key else first_line


def config_from_dict(values: dict, overrides: Sequence[str] = (), source: str = "<dict>") -> Config:
    """Build a validated Config from nested ``values`` plus dotted ``key=value`` overrides."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(values or {}))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. data.num_views=2)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {_describe(exc)}") from None
    try:
        return OmegaConf.to_object(merged)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML), apply ``overrides`` (``["data.num_views=2", ...]``) and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # YAML syntax errors come from several places
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, ...); got {type(values).__name__}")
    return config_from_dict(values or {}, overrides, source=str(path))


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so a run's results carry their recipe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))))
    tmp.replace(path)
