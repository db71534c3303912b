"""The model side of a run: network, optimizer, AMP, DDP, and the one training step.

``build_engine`` is shared by the training loop and ``dali-ba bench train``, so the benchmark
times the trainer's own step: mixup/CutMix, view chunks, label smoothing, AMP, channels-last, DDP,
the weight EMA and the optional gradient-noise probes included. On CUDA it sets what a PyTorch expert expects: cuDNN
autotuning, a fused SGD (no host sync for fp16's inf check), and DDP gradients as views of its
buckets (one copy less per step).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainers import dist as tdist
from trainers.config import Config
from trainers.diagnostics import GradNoiseMonitor
from trainers.ema import WeightEma
from trainers.evaluate import evaluate
from trainers.mixing import Mixer
from trainers.models import build_model
from trainers.nonfinite import NonFiniteGuard
from trainers.optim import build_optimizer, set_lr

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward_backward(model, images, labels, loss_fn, scaler, chunks: int, B: int, M: int, memory_format):
    """Backward of the mean loss over all M·B samples. With ``chunks`` > 1 the batch is split
    view-major (each chunk: all B images, M/chunks views each) and gradients accumulate: less
    activation memory, and BatchNorm statistics per chunk (ghost batch norm)."""
    if chunks == 1:
        parts = [(images, labels)]
    else:  # labels: [M·B] class indices or [M·B, classes] soft targets
        x, y, m = images.view(B, M, *images.shape[1:]), labels.view(B, M, *labels.shape[1:]), M // chunks
        parts = [(x[:, c * m:(c + 1) * m].flatten(0, 1).contiguous(memory_format=memory_format),
                  y[:, c * m:(c + 1) * m].flatten(0, 1)) for c in range(chunks)]
    total = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(parts):
        no_sync = model.no_sync() if i < len(parts) - 1 and isinstance(model, DDP) else nullcontext()
        with no_sync:
            loss = loss_fn(x, y) / len(parts)
            scaler.scale(loss).backward()
        total += loss.detach().float()
    return total


@dataclass
class Engine:
    """What a run trains with. ``model`` is the unwrapped module (checkpoints, evaluation);
    ``ddp`` wraps it when distributed; ``eval_net`` is what evaluation calls."""

    cfg: Config
    env: tdist.DistEnv
    model: nn.Module
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    monitor: GradNoiseMonitor
    autocast: Callable
    loss_fn: Callable
    eager_loss_fn: Callable
    eval_net: nn.Module
    memory_format: torch.memory_format
    guard: NonFiniteGuard
    mixer: Optional[Mixer] = None  # train.mixup / train.cutmix
    ema: Optional[WeightEma] = None  # train.ema_decay

    def step(self, images: torch.Tensor, labels: torch.Tensor, lr: float, step: int
             ) -> Tuple[torch.Tensor, Optional[Dict[str, float]]]:
        """One optimizer step on an M·B batch: (the mean loss as a device tensor, diagnostics or None).
        ``step`` (the global step) also seeds the step's mixup/CutMix draws."""
        self.guard.begin(self.model)  # a non-finite step puts BatchNorm's statistics back (nonfinite.py)
        set_lr(self.optimizer, lr)
        if self.mixer is not None:  # labels become soft targets [M·B, classes]
            images, labels = self.mixer(images, labels, step)
            images = images.contiguous(memory_format=self.memory_format)
        diagnose = self.monitor.due(step)
        if diagnose:
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            self.monitor.probe(self.ddp, images, labels, self.eager_loss_fn, scale)
        data = self.cfg.data
        loss = forward_backward(self.ddp, images, labels, self.loss_fn, self.scaler, self.cfg.train.view_chunks,
                                data.batch_size, data.num_views, self.memory_format)
        diag = None
        if diagnose:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            diag = self.monitor.measure(self.ddp, self.env)
        self.guard.step(self.optimizer, self.scaler, loss, step)  # skips a non-finite update (nonfinite.py)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss, diag

    def evaluate(self, loader) -> Dict[str, float]:
        """Validation metrics of the model and, with an EMA, of the average (``*_ema``) on the same batches."""
        return evaluate(self.eval_net, loader, self.env, self.autocast, self.memory_format,
                        average=self.cfg.eval.average, ema=self.ema.module if self.ema is not None else None)


def build_engine(cfg: Config, env: tdist.DistEnv, num_classes: int) -> Engine:
    """Model, optimizer, scaler, DDP, compile: everything the step needs, on ``env.device``."""
    cuda = env.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    m = cfg.model
    model = build_model(m.arch, num_classes, m.shortcut, m.zero_init_residual, m.fc_init_std).to(
        env.device, memory_format=fmt)
    optimizer = build_optimizer(model, cfg.optim, fused=cuda)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16")
    amp_dtype = AMP_DTYPES[cfg.train.amp]

    def autocast():
        return torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    ddp = model
    if env.distributed:
        ddp = DDP(model, device_ids=[env.local_rank] if cuda else None, gradient_as_bucket_view=True)
    monitor = GradNoiseMonitor(cfg.diagnostics.every, cfg.data.batch_size, cfg.data.num_views, env.world)
    monitor.attach(ddp)
    # Compiled once for the training batch shape and once for evaluation (eval mode, the unwrapped
    # model); the diagnostics' probes (other shapes, a few calls) run eagerly.
    net = torch.compile(ddp) if cfg.train.compile else ddp

    def loss_fn(x, y, net=net):
        with autocast():
            return criterion(net(x).float(), y)

    def eager_loss_fn(x, y):
        return loss_fn(x, y, net=ddp)

    t = cfg.train
    mixer = None
    if t.mixup > 0 or t.cutmix > 0:
        mixer = Mixer(t.mixup, t.cutmix, t.mixup_switch_prob, num_classes, cfg.data.batch_size, cfg.data.num_views,
                      t.seed, env.rank)
    ema = WeightEma(model, t.ema_decay) if t.ema_decay > 0 else None
    guard = NonFiniteGuard(env.device, env.distributed)
    return Engine(cfg, env, model, ddp, optimizer, scaler, monitor, autocast, loss_fn, eager_loss_fn,
                  torch.compile(model) if cfg.train.compile else model, fmt, guard, mixer, ema)
