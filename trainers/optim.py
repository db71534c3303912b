"""SGD with momentum, optionally without weight decay on BatchNorm weights and biases."""
from __future__ import annotations

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool) -> list:
    """One group, or two: 1-d parameters (BN scales/shifts, biases) get no weight decay."""
    if not no_decay_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """The LR is set before every step from the schedule (trainers.schedule); 0 here is a placeholder.
    ``fused`` (CUDA): one kernel for all parameters, and with fp16 AMP the scaler's inf check stays
    on the GPU instead of a host sync per step."""
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.no_decay_bn_bias)
    return torch.optim.SGD(groups, lr=0.0, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                           **({"fused": True} if fused else {}))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
