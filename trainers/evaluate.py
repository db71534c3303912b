"""Validation: every image exactly once over all ranks, one centre view or M averaged views, of the
model and (with ``train.ema_decay``) of its weight average, on the same batches.

Shards may differ by one batch between ranks, so nothing here runs a collective per batch: each
rank sums loss, hits and count locally and they are all-reduced once at the end. The model is the
unwrapped module (a DDP forward would broadcast buffers, a collective, on every batch). A file that
fails to decode on one rank is carried by that final reduction too, so every rank raises the same
``DataFailure`` instead of the others waiting for it.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dali_ba.errors import DecodeError
from trainers import dist as tdist
from trainers.faults import DataFailure, gather_failure
from trainers.metrics import topk_correct


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: tdist.DistEnv, autocast: Callable[[], AbstractContextManager],
             memory_format=torch.contiguous_format, average: str = "softmax",
             ema: Optional[nn.Module] = None) -> Dict[str, float]:
    """``val_top1``/``val_top5`` (%), ``val_loss``, ``val_images``, ``val_views``, ``eval_time``; with
    ``ema`` (a second model, the weight average) also ``val_top1_ema``/``val_top5_ema``/``val_loss_ema``
    on the same batches. ``average``: how test-time views combine (``view_log_probs``)."""
    start = time.perf_counter()
    models = {"": model, **({"_ema": ema} if ema is not None else {})}
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    sums = torch.zeros(len(models), 4, dtype=torch.float64, device=env.device)  # loss, top-1, top-5, images
    views = getattr(loader, "views", 1)
    try:
        _accumulate(list(models.values()), loader, env, autocast, memory_format, sums, views, average)
        failure = None
    except DecodeError as exc:
        failure = exc
    totals = tdist.all_reduce_sum(env, sums.flatten().tolist() + [float(failure is not None)])
    for name, m in models.items():
        m.train(was_training[name])
    if totals[-1]:
        raise DataFailure(f"validation: {gather_failure(env, failure)}")
    out: Dict[str, float] = {}
    for k, suffix in enumerate(models):
        loss_sum, top1, top5, count = totals[4 * k:4 * k + 4]
        n = max(count, 1.0)
        out.update({f"val_top1{suffix}": 100.0 * top1 / n, f"val_top5{suffix}": 100.0 * top5 / n,
                    f"val_loss{suffix}": loss_sum / n})
    out.update(val_images=int(totals[3]), val_views=views, eval_time=time.perf_counter() - start)
    return out


def view_log_probs(logits: torch.Tensor, views: int, average: str = "softmax") -> torch.Tensor:
    """``[b·views, C]`` logits (image-major) → ``[b, C]`` log-probabilities of each image's prediction:
    ``softmax``: the log of the mean of the views' softmaxes; ``logits``: the log-softmax of the
    mean of their logits (the authors' ``_average_duplicates``)."""
    logits = logits.float()
    if views == 1:
        return logits.log_softmax(dim=1)
    grouped = logits.view(-1, views, logits.shape[1])
    if average == "logits":
        return grouped.mean(dim=1).log_softmax(dim=1)
    return grouped.softmax(dim=2).mean(dim=1).clamp_min(1e-12).log()


def _accumulate(models, loader, env, autocast, memory_format, sums, views, average) -> None:
    for images, labels in loader:
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        x = images.flatten(0, 1) if views > 1 else images  # [b, V, C, H, W] → [b·V, C, H, W]
        x = x.contiguous(memory_format=memory_format)
        for k, model in enumerate(models):
            with autocast():
                logits = model(x)
            log_probs = view_log_probs(logits, views, average)
            sums[k, 0] += F.nll_loss(log_probs, labels, reduction="sum").double()
            sums[k, 1:3] += topk_correct(log_probs, labels, (1, 5))
            sums[k, 3] += labels.shape[0]
