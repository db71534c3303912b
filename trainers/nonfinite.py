"""Steps that are not finite (a NaN/inf loss, gradients or BatchNorm statistics): skipped, counted, stopped.

Policy (``train.nonfinite_limit``, default 0): such a step leaves no trace. Its update is skipped
(weights and momentum untouched), the BatchNorm statistics its forward pass moved are put back, and
it is counted. The count is read with the logged loss (every ``train.log_every`` steps and before
every checkpoint), host syncs the trainer makes anyway; once more steps than the limit were not
finite, the run saves a checkpoint (its weights are those of the finite steps) and stops with one
line naming the first such step and its loss. Before any checkpoint is written the model's state is
checked, so weights or statistics that are not finite are never saved.

On a GPU nothing here waits for the device: the checks are tensors on it, and a fused optimizer
skips its update from a device-side flag (``found_inf``, as AMP's scaler does). Under DDP only the
gradients after the all-reduce, identical on every rank, decide the update, so the ranks' weights
never drift apart (a loss or statistics not finite on one rank are still counted and put back).
With fp16 AMP the scaler skips updates whose gradients overflow (normal: it lowers its scale), so
only the loss and statistics count then. On the CPU the flag is read at once (there is no device).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch


class NonFiniteGuard:
    """Per-step checks and counters, kept on ``device``; ``distributed``: under DDP."""

    def __init__(self, device: torch.device, distributed: bool = False):
        self.device, self.distributed = device, distributed
        self._count = torch.zeros((), dtype=torch.float64, device=device)  # non-finite steps seen
        self._first = torch.full((2,), math.nan, dtype=torch.float64, device=device)  # (step, loss) of the first
        self._ready = False
        self._buffers: List[List[torch.Tensor]] = []  # the model's buffers, grouped by dtype
        self._saved: Optional[List[torch.Tensor]] = None

    def begin(self, model: torch.nn.Module) -> None:
        """Before the step's first forward pass: keep the buffers (BatchNorm's running statistics and
        counters), one flat copy per dtype on the device."""
        groups: dict = {}
        for b in model.buffers():
            groups.setdefault(b.dtype, []).append(b)
        self._buffers = list(groups.values())
        self._saved = [torch.cat([b.detach().flatten() for b in group]) for group in self._buffers]

    def _now(self) -> List[torch.Tensor]:
        return [torch.cat([b.detach().flatten() for b in group]) for group in self._buffers] if self._saved else []

    def _put_back(self, bad: torch.Tensor, now: List[torch.Tensor]) -> None:
        """The kept buffers again where ``bad`` (a device flag): a skipped step leaves no statistics behind."""
        for group, saved, current in zip(self._buffers, self._saved or [], now):
            chosen = torch.split(torch.where(bad, saved, current), [b.numel() for b in group])
            torch._foreach_copy_(group, [c.view_as(b) for c, b in zip(chosen, group)])
        self._saved = None

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
             step: int) -> None:
        """``scaler.step(optimizer)`` and ``scaler.update()``, unless the step is not finite (then the
        buffers kept by ``begin`` are put back too)."""
        now = self._now()
        bad = ~torch.isfinite(loss.detach())  # this rank's loss and statistics
        for values in now:
            if values.is_floating_point():
                bad = bad | ~torch.isfinite(values).all()
        if scaler.is_enabled():  # fp16: the scaler checks the (all-reduced) gradients itself
            self._record(bad, loss, step)
            self._put_back(bad, now)
            scaler.step(optimizer)
            scaler.update()
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # One fused pass: a NaN or an inf makes its tensor's norm NaN or inf (so does a gradient so large,
        # above ~1e19, that its square overflows: such a step would wreck the weights anyway).
        bad_grads = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, 2.0)).sum()) if grads \
            else torch.zeros((), dtype=torch.bool, device=loss.device)
        self._record(bad | bad_grads, loss, step)
        self._put_back(bad | bad_grads, now)
        # Under DDP only the all-reduced gradients are the same on every rank: they alone decide the
        # update, so the ranks' weights never differ. In one process any sign decides.
        skip = bad_grads if self.distributed else bad | bad_grads
        if self._fused_ready(optimizer):  # the kernel skips the update when found_inf is 1: no host sync
            optimizer.grad_scale, optimizer.found_inf = None, skip.float()
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not bool(skip):  # CPU (no device to wait for), or a fused optimizer's first step
            optimizer.step()

    def _fused_ready(self, optimizer: torch.optim.Optimizer) -> bool:
        """A fused optimizer whose state exists: a skipped first step would leave its momentum
        buffers uninitialised, so that one step decides on the host."""
        if not optimizer.defaults.get("fused"):
            return False
        if not self._ready:
            self._ready = all(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]
                              if p.requires_grad)
        return self._ready

    def _record(self, bad: torch.Tensor, loss: torch.Tensor, step: int) -> None:
        self._count += bad
        first = bad & torch.isnan(self._first[0])  # no host value is copied to the device: no sync
        self._first[1].copy_(torch.where(first, loss.detach().double(), self._first[1]))
        self._first[0].copy_(torch.where(first, float(step), self._first[0]))

    def count(self) -> float:
        """Non-finite steps so far (a host sync: call it where the loss is read anyway)."""
        return float(self._count.item())

    def first(self) -> tuple:
        """(step, loss) of the first non-finite step, 1-based step like the logs; (None, None) if none."""
        step, loss = self._first.tolist()
        return (None, None) if math.isnan(step) else (int(step) + 1, loss)

    def state_dict(self) -> dict:
        step, loss = self.first()
        return {"count": self.count(), "first_step": step, "first_loss": loss}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        self._count.fill_(state.get("count", 0.0))
        if state.get("first_step") is not None:
            self._first.copy_(torch.tensor([state["first_step"] - 1, state["first_loss"]], dtype=torch.float64))


def nonfinite_entries(state: dict) -> List[str]:
    """Names of the floating-point entries of a state dict that hold NaN or inf (one sync)."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(state[k]).all() for k in names]).tolist()
    return [k for k, good in zip(names, ok) if not good]
