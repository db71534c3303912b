"""Validation: every image exactly once over all ranks, one centre view or M averaged views.

Shards may differ by one batch between ranks, so nothing here runs a collective per batch: each
rank sums loss, hits and count locally and they are all-reduced once at the end. The model is the
unwrapped module (a DDP forward would broadcast buffers, a collective, on every batch). A file that
fails to decode on one rank is carried by that final reduction too, so every rank raises the same
``DataFailure`` instead of the others waiting for it.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from dali_ba.errors import DecodeError
from trainers import dist as tdist
from trainers.faults import DataFailure, gather_failure
from trainers.metrics import topk_correct


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: tdist.DistEnv, autocast: Callable[[], AbstractContextManager],
             memory_format=torch.contiguous_format) -> Dict[str, float]:
    """``val_top1``/``val_top5`` (%), ``val_loss``, ``val_images``, ``val_views``, ``eval_time``."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top-1 hits, top-5 hits, images
    views = getattr(loader, "views", 1)
    try:
        _accumulate(model, loader, env, autocast, memory_format, sums, views)
        failure = None
    except DecodeError as exc:
        failure = exc
    loss_sum, top1, top5, count, failed = tdist.all_reduce_sum(env, sums.tolist() + [float(failure is not None)])
    model.train(was_training)
    if failed:
        raise DataFailure(f"validation: {gather_failure(env, failure)}")
    n = max(count, 1.0)
    return {"val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n, "val_loss": loss_sum / n,
            "val_images": int(count), "val_views": views, "eval_time": time.perf_counter() - start}


def _accumulate(model, loader, env, autocast, memory_format, sums, views) -> None:
    for images, labels in loader:
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        b = labels.shape[0]
        if views > 1:  # [b, V, C, H, W]: average the softmax over the views (test-time averaging)
            x = images.flatten(0, 1).contiguous(memory_format=memory_format)
            with autocast():
                logits = model(x)
            probs = logits.float().softmax(dim=1).view(b, views, -1).mean(dim=1)
            log_probs = probs.clamp_min(1e-12).log()
        else:
            with autocast():
                logits = model(images.contiguous(memory_format=memory_format))
            log_probs = logits.float().log_softmax(dim=1)
        sums[0] += F.nll_loss(log_probs, labels, reduction="sum").double()
        sums[1:3] += topk_correct(log_probs, labels, (1, 5))
        sums[3] += b
