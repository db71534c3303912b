"""An exponential moving average (EMA) of the model's weights (``train.ema_decay``).

After every optimizer step, ``ema ← decay · ema + (1 − decay) · weights`` for the parameters and
the floating-point buffers (BatchNorm running statistics, as timm's ``ModelEmaV2``); integer
buffers (``num_batches_tracked``) are copied. It starts as a copy of the initial model. Its horizon
is about 1 / (1 − decay) steps, so a decay is tied to the steps per epoch (0.9998 ≈ one ImageNet
epoch at 256 images per step). The average is evaluated beside the model (``val_*_ema`` metrics)
and saved in every checkpoint, so a resumed run continues it exactly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightEma:
    """``module``: the averaged copy of the model (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimizer step)."""
        averaged, current = self.module.state_dict(), model.state_dict()  # tensors sharing the modules' storage
        floats = [name for name, t in averaged.items() if t.is_floating_point()]
        torch._foreach_lerp_([averaged[n] for n in floats], [current[n] for n in floats], 1.0 - self.decay)
        for name, tensor in averaged.items():
            if not tensor.is_floating_point():
                tensor.copy_(current[name])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
