"""Gradient-noise statistics that explain batch augmentation, measured during training.

Model of one rank's gradients (units: images; every image carries M views). With μ the true
gradient, image sampling adds noise of per-image covariance Σ_img and augmentation adds noise of
per-image-per-view covariance Σ_aug, independent across views:

    g_v      (B images, view v only)   = μ + a + e_v        Cov = (Σ_img + Σ_aug) / B
    G_local  (B images, all M views)   = μ + a + mean_v e_v  Cov = (Σ_img + Σ_aug/M) / B = Σ / B

so  E|g_v − G_local|² = (1 − 1/M) tr(Σ_aug) / B   (the view-group variance; ``aug_noise_trace``)
and the BA gradient is (tr Σ + (1 − 1/M) tr Σ_aug) / tr Σ times less noisy than the M=1 gradient of
the same B images (``ba_var_reduction``: M if views were as good as new images, 1 if useless).

The simple noise scale B_simple = tr(Σ)/|μ|² (McCandlish et al. 2018, App. A) comes from the
squared norms of two unbiased gradient estimates with batch sizes B_s < B_b:

    |G|²  ≈ (B_b |G_b|² − B_s |G_s|²) / (B_b − B_s)        tr(Σ) ≈ (|G_s|² − |G_b|²) / (1/B_s − 1/B_b)

Pairs used, cheapest first:
- ``ddp`` (world > 1, free): each rank's local gradient before the all-reduce (read in a DDP
  communication hook, B images) and the all-reduced gradient (B·world images).
- ``half`` (single process): a probe backward on the first B/2 images with all their views,
  against the full step's gradient.
The view-group gradient g_v is one probe backward on view v of all B local images (v cycles). One
probe per measurement at most: with world > 1 it is the view probe; in a single process with
M > 1 the probe alternates between view and half. Probes run before the step under ``no_sync``,
restore BatchNorm buffers afterwards and never touch the optimizer, so a run with diagnostics
trains exactly like one without. (Caveat: with BatchNorm a probe's batch statistics come from its
own smaller batch, so g_v is not exactly a sub-average of G_local.)
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from trainers import dist as tdist


class _Ema:
    """Bias-corrected exponential moving average."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.value, self.n = beta, 0.0, 0

    def update(self, x: float) -> None:
        if math.isfinite(x):
            self.value, self.n = self.beta * self.value + (1 - self.beta) * x, self.n + 1

    def get(self) -> Optional[float]:
        return self.value / (1 - self.beta ** self.n) if self.n else None


def pair_estimates(small_norm2: float, b_small: float, big_norm2: float, b_big: float) -> Dict[str, float]:
    """McCandlish et al. App. A: unbiased |G|², tr(Σ) and their ratio from two batch sizes."""
    g2 = (b_big * big_norm2 - b_small * small_norm2) / (b_big - b_small)
    trace = (small_norm2 - big_norm2) / (1.0 / b_small - 1.0 / b_big)
    return {"noise_g2": g2, "noise_trace": trace, "noise_scale": trace / g2 if g2 != 0 else float("nan")}


class _HookState:
    def __init__(self):
        self.active = False
        self.local_sq = None  # sum over buckets of |local grad|², before the all-reduce
        self.dot = None  # sum over buckets of <local grad, probe grad>
        self.probe: Dict[int, torch.Tensor] = {}  # data_ptr of a parameter -> its probe gradient


def _comm_hook(state: _HookState, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if state.active:
        buf = bucket.buffer().detach().float()
        sq = buf.pow(2).sum()
        state.local_sq = sq if state.local_sq is None else state.local_sq + sq
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            probe = state.probe.get(p.data_ptr())
            if probe is not None:
                d = (g.detach().float() * probe).sum()
                state.dot = d if state.dot is None else state.dot + d
    return allreduce_hook(None, bucket)


class GradNoiseMonitor:
    def __init__(self, every: int, batch_size: int, num_views: int, world: int, ema_beta: float = 0.9):
        self.every, self.B, self.M, self.world = every, batch_size, num_views, world
        self.count = 0  # measurements so far (chooses the probe and its view)
        self.ema = {k: _Ema(ema_beta) for k in ("trace", "g2", "aug")}
        self._hook = _HookState()
        self._probe_kind: Optional[str] = None
        self._probe_norm2 = 0.0

    # -- set-up and state -------------------------------------------------------------------
    def attach(self, ddp_model: nn.Module) -> None:
        """Register the communication hook that reads each rank's local gradient (world > 1)."""
        if self.every and self.world > 1:
            ddp_model.register_comm_hook(self._hook, _comm_hook)

    def due(self, step: int) -> bool:
        """Measure on the update that brings the step count to a multiple of ``every``."""
        return self.every > 0 and (step + 1) % self.every == 0

    def state_dict(self) -> dict:
        return {"count": self.count, "ema": {k: (e.value, e.n) for k, e in self.ema.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        for k, (value, n) in state["ema"].items():
            self.ema[k].value, self.ema[k].n = value, n

    def _choose_probe(self) -> Optional[str]:
        if self.world > 1:
            return "view" if self.M > 1 else None
        if self.M > 1:
            return "view" if self.count % 2 == 0 or self.B < 2 else "half"
        return "half" if self.B >= 2 else None

    # -- before the step: the probe ---------------------------------------------------------
    def probe(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], grad_scale: float) -> None:
        """One extra backward on a sub-batch; leaves .grad cleared and BN buffers untouched."""
        kind = self._probe_kind = self._choose_probe()
        self.view = (self.count // (2 if self.world == 1 else 1)) % self.M
        self._hook.probe, self._hook.local_sq, self._hook.dot = {}, None, None
        self._hook.active = self.world > 1
        self._scale, self._probe_norm2 = grad_scale, 0.0
        if kind is None:
            return
        if kind == "view":  # flat image-major [B·M] -> view v of every image
            x = images.view(self.B, self.M, *images.shape[1:])[:, self.view]
            y = labels.view(self.B, self.M, *labels.shape[1:])[:, self.view]  # (soft targets too)
        else:  # the first half of the images, all their views
            n = (self.B // 2) * self.M
            x, y = images[:n], labels[:n]
        module = getattr(model, "module", model)
        saved = [b.detach().clone() for b in module.buffers()]
        sync = model.no_sync() if hasattr(model, "no_sync") else nullcontext()
        with sync:
            (loss_fn(x, y) * grad_scale).backward()
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)
        probe, norm2 = {}, []
        for p in module.parameters():
            if p.grad is not None:
                g = p.grad.detach().float() / grad_scale
                probe[p.data_ptr()] = g
                norm2.append(g.pow(2).sum())
            p.grad = None
        self._hook.probe, self._probe_norm2 = probe, float(torch.stack(norm2).sum()) if norm2 else 0.0

    # -- after backward (and AMP unscale), before the optimizer step -------------------------
    def measure(self, model: nn.Module, env: tdist.DistEnv) -> Dict[str, float]:
        """Statistics of this step (a collective on every rank when distributed)."""
        module = getattr(model, "module", model)
        sums = []  # per parameter: |g|², <g, probe> (one host synchronisation at the end)
        for p in module.parameters():
            if p.grad is not None:
                g = p.grad.detach().float()
                probe = self._hook.probe.get(p.data_ptr())
                dot = (g * probe).sum() if probe is not None and self.world == 1 else g.new_zeros(())
                sums.append(torch.stack([g.pow(2).sum(), dot]))
        big2, dot_local = torch.stack(sums).sum(0).tolist() if sums else (0.0, 0.0)
        kind, scale = self._probe_kind, self._scale
        if self.world > 1:  # the hook saw scaled local gradients (AMP fp16); undo the scale
            local2 = float(self._hook.local_sq or 0.0) / scale**2
            dot_local = float(self._hook.dot or 0.0) / scale
        else:
            local2 = big2
        probe2 = self._probe_norm2
        view_var = probe2 - 2 * dot_local + local2 if kind == "view" else 0.0
        local2, probe2, view_var = (v / self.world for v in tdist.all_reduce_sum(env, [local2, probe2, view_var]))
        self._hook.active, self._hook.probe = False, {}
        self.count += 1

        out: Dict[str, float] = {"grad_norm2": big2}
        if self.world > 1:
            out.update(grad_norm2_local=local2, noise_pair="ddp",
                       **pair_estimates(local2, self.B, big2, self.B * self.world))
        elif kind == "half":
            out.update(noise_pair="half", **pair_estimates(probe2, self.B // 2, big2, self.B))
        if kind is not None:
            out["probe"] = kind
        if kind == "view":
            aug = view_var * self.B * self.M / (self.M - 1)
            out.update(probe_view=self.view, grad_norm2_view=probe2, view_grad_var=view_var,
                       view_grad_var_rel=view_var / local2 if local2 > 0 else float("nan"), aug_noise_trace=aug)
            self.ema["aug"].update(aug)
        if "noise_trace" in out:
            self.ema["trace"].update(out["noise_trace"])
            self.ema["g2"].update(out["noise_g2"])
        trace, g2, aug = (self.ema[k].get() for k in ("trace", "g2", "aug"))
        if trace is not None and g2 is not None and trace > 0 and g2 > 0:  # early estimates can be negative
            out["noise_scale_ema"] = trace / g2
        if trace is not None and trace > 0 and aug is not None and self.M > 1:
            out["ba_var_reduction"] = (trace + aug * (1 - 1 / self.M)) / trace
        return out
