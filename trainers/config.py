"""The trainer's configuration: dali_ba's ``data:`` section composed with the trainer's own sections.

``load_config("pipelines/X.yaml", ["train.amp=off", ...])`` reads a run recipe with dali_ba's
YAML machinery (YAML 1.2 booleans, unknown keys and bad values rejected with the file and key),
validated by the dataclasses below; the resolved config is saved beside the run's results.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

from dali_ba import config as data_config
from dali_ba.config import ConfigError, DataConfig, check_at_least, check_between, check_choice, expand_user_paths

LR_SCALING = ("none", "linear", "sqrt")
SCHEDULES = ("step", "cosine")
WARMUPS = ("linear", "legw")
AMP_MODES = ("off", "bf16", "fp16")
VIEW_AVERAGES = ("softmax", "logits")
SHORTCUTS = ("auto", "pad", "projection")  # trainers.models


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"  # torchvision resnet18/34/50/101, cifar resnet20/44/56, resnet8, smallnet
    num_classes: int = 0  # 0: the number of class folders in data.train_root
    shortcut: str = "auto"  # CIFAR ResNets: "pad" (He et al.'s option A, = auto) or "projection" (the BA authors')
    zero_init_residual: bool = False  # the last BatchNorm of each residual block starts at 0 (the BA authors')
    fc_init_std: float = 0.0  # classifier weight ~ N(0, std), bias 0 (the BA authors: 0.01); 0 = default init

    def __post_init__(self) -> None:
        check_choice("model.shortcut", self.shortcut, SHORTCUTS)
        check_at_least("model.fc_init_std", self.fc_init_std, 0.0)


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
        if not self.lr > 0:  # 0 would train nothing, without a word
            raise ConfigError(f"optim.lr: expected a value > 0; got {self.lr!r}")
        check_choice("optim.lr_scaling", self.lr_scaling, LR_SCALING)
        check_at_least("optim.reference_batch", self.reference_batch, 1)
        check_between("optim.momentum", self.momentum, 0.0, 1.0, high_open=True)  # 1 or more diverges
        check_at_least("optim.weight_decay", self.weight_decay, 0.0)
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
        check_choice("schedule.kind", self.kind, SCHEDULES)
        check_choice("schedule.warmup", self.warmup, WARMUPS)
        check_at_least("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        check_between("schedule.gamma", self.gamma, 0.0, 1.0, low_open=True)  # a step schedule decays
        check_at_least("schedule.min_lr", self.min_lr, 0.0)
        if list(self.milestones) != sorted(self.milestones) or any(not m > 0 for m in self.milestones):
            raise ConfigError(f"schedule.milestones: expected increasing epochs > 0; got {list(self.milestones)}")
        if self.kind != "cosine" and self.min_lr != 0:
            raise ConfigError(f"schedule.min_lr: only schedule.kind=cosine decays to it; got {self.min_lr!r} "
                              f"with kind={self.kind}")


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
    log_every: int = 10  # steps between logged losses (each costs a device sync)
    tensorboard: bool = False
    dist_timeout_s: int = 600  # a dead rank brings the others down after this many seconds
    mixup: float = 0.0  # mixup's Beta(α, α) alpha on the M·B batch (trainers/mixing.py); 0 = off
    cutmix: float = 0.0  # CutMix's alpha; 0 = off
    mixup_switch_prob: float = 0.5  # with both on: the probability that a sample uses CutMix
    ema_decay: float = 0.0  # EMA of the weights, updated after every step, evaluated and saved beside them; 0 = off
    nonfinite_limit: int = 0  # steps with a NaN/inf loss skipped before the run stops (trainers/nonfinite.py)

    def __post_init__(self) -> None:
        expand_user_paths(self, ("out_dir",) + (() if self.resume in ("auto", "none") else ("resume",)))
        if not self.epochs > 0:
            raise ConfigError(f"train.epochs: expected a value > 0; got {self.epochs!r}")
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir: expected a folder; got an empty path")
        check_at_least("train.mixup", self.mixup, 0.0)
        check_at_least("train.cutmix", self.cutmix, 0.0)
        if not 0.0 <= self.mixup_switch_prob <= 1.0:
            raise ConfigError(f"train.mixup_switch_prob: expected 0 <= value <= 1; got {self.mixup_switch_prob!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: expected 0 <= value < 1 (0 = off); got {self.ema_decay!r}")
        for key in ("max_steps", "eval_every", "checkpoint_every", "nonfinite_limit"):
            check_at_least(f"train.{key}", getattr(self, key), 0)
        check_between("train.seed", self.seed, 0, 2**32 - 1)  # numpy's seed range
        check_at_least("train.log_every", self.log_every, 1)
        check_at_least("train.view_chunks", self.view_chunks, 1)
        check_between("train.dist_timeout_s", self.dist_timeout_s, 1, 7 * 24 * 3600)
        check_choice("train.amp", self.amp, AMP_MODES)


@dataclass(frozen=True)
class EvalConfig:
    views: int = 1  # >1: test-time averaging over this many augmented views
    batch_size: int = 0  # 0: data.batch_size
    average: str = "softmax"  # test-time views: average the "softmax" outputs or the "logits" (the BA authors')

    def __post_init__(self) -> None:
        check_at_least("eval.views", self.views, 1)
        check_at_least("eval.batch_size", self.batch_size, 0)
        check_choice("eval.average", self.average, VIEW_AVERAGES)


@dataclass(frozen=True)
class DiagnosticsConfig:
    every: int = 0  # steps between gradient-noise measurements; 0 = off

    def __post_init__(self) -> None:
        check_at_least("diagnostics.every", self.every, 0)


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
        if (self.train.mixup > 0 or self.train.cutmix > 0) and self.data.batch_size < 2:
            raise ConfigError(f"train.mixup/train.cutmix: mixing pairs different images, so data.batch_size must be "
                              f"at least 2; got {self.data.batch_size}")
        if self.schedule.warmup_epochs >= self.train.epochs:
            raise ConfigError(f"schedule.warmup_epochs: {self.schedule.warmup_epochs!r} is not shorter than the run "
                              f"(train.epochs={self.train.epochs!r}): the LR would never reach optim.lr")
        if self.schedule.kind == "cosine" and self.schedule.min_lr > self.optim.lr:
            raise ConfigError(f"schedule.min_lr: {self.schedule.min_lr!r} is above optim.lr={self.optim.lr!r}: "
                              "the cosine schedule would raise the LR")
        if self.data.dtype == "float16" and self.train.amp == "off":
            raise ConfigError("data.dtype=float16 needs train.amp=fp16 or bf16: an fp32 model cannot take "
                              "float16 images (or set data.dtype=float32)")


def for_world(cfg: Config, world: int) -> Config:
    """``cfg`` for ``world`` ranks: with ``data.global_batch_size`` set, ``data.batch_size`` becomes
    its share per rank (a ConfigError, the same on every rank, when it does not divide)."""
    total = cfg.data.global_batch_size
    if total == 0:
        return cfg
    if total % world:
        error = ConfigError(f"data.global_batch_size={total} does not divide among {world} ranks; use a multiple "
                            f"of {world} or another number of ranks")
        error.all_ranks = True
        raise error
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=total // world))


def config_from_dict(values: dict, overrides: Sequence[str] = (), source: str = "<dict>") -> Config:
    """A validated trainer Config from nested ``values`` plus dotted ``key=value`` overrides."""
    return data_config.config_from_dict(values, overrides, source, schema=Config)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a run recipe (YAML), apply ``overrides`` in order and validate every section."""
    return data_config.load_config(path, overrides, schema=Config)
