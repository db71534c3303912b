"""The learning rate as a pure function of the optimizer step (nanoGPT's ``get_lr``).

Batch augmentation keeps the baseline's schedule: the same epochs, so the same number of steps
(steps per epoch = N / (B · world), whatever M is). Scaling rules are options, relative to
``optim.reference_batch``:

    k = global batch / reference_batch,   global batch = B · world  (· M with optim.scale_with_views)
    none: lr            linear: lr · k (Goyal et al. 2017)            sqrt: lr · √k

Warmup ramps linearly from lr/W to lr over the first W steps. ``schedule.warmup=legw`` (You et
al. 2019, "Large-batch training for LSTM and beyond": linear-epoch gradual warmup) lengthens the
warmup with the batch: warmup_epochs · k. After warmup: ``step`` multiplies by ``gamma`` at each
milestone epoch; ``cosine`` decays to ``schedule.min_lr``, reached at the end of ``train.epochs``.
``train.max_steps`` only stops the run; it never changes this function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"  # step | cosine
    milestones: Tuple[int, ...] = ()  # steps (kind=step)
    gamma: float = 0.1
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        """LR of optimizer step ``step`` (0-based: the first update uses lr(0))."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.peak_lr * self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_ratio(reference_batch: int, batch_size: int, num_views: int, world: int, with_views: bool) -> float:
    """k: the global batch (unique images, or samples with ``with_views``) over the reference."""
    return batch_size * world * (num_views if with_views else 1) / reference_batch


def scaled_lr(lr: float, rule: str, k: float) -> float:
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    raise ValueError(f"optim.lr_scaling: expected none, linear or sqrt; got {rule!r}")


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    return max(1, math.ceil(epochs * steps_per_epoch - 1e-9))


def build_schedule(cfg, steps_per_epoch: int, world: int) -> LRSchedule:
    """The schedule of a Config for a loader with ``steps_per_epoch`` steps on each of ``world`` ranks."""
    k = batch_ratio(
        cfg.optim.reference_batch, cfg.data.batch_size, cfg.data.num_views, world, cfg.optim.scale_with_views
    )
    warmup_epochs = cfg.schedule.warmup_epochs * (k if cfg.schedule.warmup == "legw" else 1.0)
    schedule = LRSchedule(
        peak_lr=scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, k),
        total_steps=total_steps(cfg.train.epochs, steps_per_epoch),
        warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
        kind=cfg.schedule.kind,
        milestones=tuple(int(round(m * steps_per_epoch)) for m in cfg.schedule.milestones),
        gamma=cfg.schedule.gamma,
        min_lr=cfg.schedule.min_lr,
    )
    check_schedule(schedule, cfg)
    return schedule


def check_schedule(schedule: LRSchedule, cfg) -> None:
    """ConfigError for a schedule that never reaches its peak or rises where it should decay, once
    the scaling rule and the number of steps are known (``trainers.config`` checks the plain values)."""
    from dali_ba.errors import ConfigError

    if schedule.warmup_steps >= schedule.total_steps:
        rule = " (schedule.warmup=legw lengthens it with the batch)" if cfg.schedule.warmup == "legw" else ""
        raise ConfigError(f"schedule.warmup_epochs: the warmup takes {schedule.warmup_steps} steps{rule}, the run "
                          f"{schedule.total_steps}: the LR would never reach its peak; shorten the warmup")
    if schedule.kind == "cosine" and schedule.min_lr > schedule.peak_lr:
        raise ConfigError(f"schedule.min_lr: {schedule.min_lr:g} is above the peak LR {schedule.peak_lr:g} (optim.lr "
                          f"{cfg.optim.lr:g} scaled by optim.lr_scaling={cfg.optim.lr_scaling}): the cosine schedule "
                          "would raise the LR")
