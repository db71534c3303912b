"""Mixup and CutMix on the M·B batch of batch augmentation, with soft targets.

Row ``i = b·M + v`` of the flat batch is view v of image b. Each row is mixed with view v of
another image, ``σ_v(b)``, where σ_v is a random cyclic permutation of the B images drawn for view v:
- **never two views of the same image**: mixing view v of b with another view of b (or with
  itself) would blend two augmentations under one label: no label mixing at all, only a weaker
  copy of what the M views already do;
- **each view its own partner, λ and (with both on) its own choice of mixup or CutMix**: the mix
  is part of a view's augmentation, drawn independently like its crop and flip, so the M views of
  an image stay M different samples;
- **a permutation of the rows**: every row is some row's partner exactly once, so every image
  still weighs M views in the batch, labels included.

Per row, λ ~ Beta(α, α). Mixup: ``x = λ·x_i + (1 − λ)·x_j``. CutMix (Yun et al.): a box of
⌊H·√(1−λ)⌋ × ⌊W·√(1−λ)⌋ pixels centred on a uniform pixel and clipped at the border is pasted from
x_j, and λ becomes the share of the image kept. Targets ``λ·onehot(y_i) + (1 − λ)·onehot(y_j)``
sum to one; the loss stays the mean over the M·B rows. With both alphas, a row uses CutMix with
probability ``mixup_switch_prob`` (timm's ``switch_prob``). Label smoothing ε in the loss turns a
soft target t into (1 − ε)·t + ε/C, the same as smoothing each one-hot before mixing (timm's
order): both are linear.

The draws come from a numpy generator seeded by (train seed, rank, step): nothing to checkpoint,
a resumed run repeats them exactly, and ranks differ.

The authors' code (convNet.pytorch ``trainer.py`` with utils ``mixup.py``) draws one λ per batch
and one random permutation of all M·B rows (so a row may meet another view of its own image, or
itself), and uses CutMix instead of mixup when both are given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class MixDraws:
    """One step's draws for N = B·M rows (numpy, on the host)."""

    partners: np.ndarray  # [N] int: the row each row is mixed with
    lam: np.ndarray  # [N] float: the share of the row's own image (CutMix: after clipping its box)
    cut: np.ndarray  # [N] bool: CutMix (else mixup)
    boxes: np.ndarray  # [N, 4] int: CutMix's pasted box (top, bottom, left, right), half-open; empty for mixup


def partner_rows(rng: np.random.Generator, num_images: int, num_views: int) -> np.ndarray:
    """[B·M] rows: view v of image b is paired with view v of image σ_v(b) ≠ b (σ_v a random B-cycle)."""
    order = np.argsort(rng.random((num_views, num_images)), axis=1)  # a random order of the images per view
    successor = np.empty_like(order)
    successor[np.arange(num_views)[:, None], order] = np.roll(order, -1, axis=1)  # σ_v: each image → the next
    return (successor.T * num_views + np.arange(num_views)).reshape(-1)  # image-major rows


def draw(rng: np.random.Generator, num_images: int, num_views: int, height: int, width: int, mixup: float,
         cutmix: float, switch_prob: float) -> MixDraws:
    """Partners, λ, mixup-or-CutMix and CutMix boxes for one step (alphas of 0 are off)."""
    n = num_images * num_views
    partners = partner_rows(rng, num_images, num_views)
    if mixup > 0 and cutmix > 0:
        cut = rng.random(n) < switch_prob
    else:
        cut = np.full(n, cutmix > 0)
    lam = np.ones(n)
    if mixup > 0:
        lam[~cut] = rng.beta(mixup, mixup, int((~cut).sum()))
    boxes = np.zeros((n, 4), dtype=np.int64)
    if cut.any():
        k = int(cut.sum())
        ratio = np.sqrt(1.0 - rng.beta(cutmix, cutmix, k))
        half_h, half_w = (height * ratio).astype(np.int64) // 2, (width * ratio).astype(np.int64) // 2
        cy, cx = rng.integers(0, height, k), rng.integers(0, width, k)
        boxes[cut] = np.stack([np.clip(cy - half_h, 0, height), np.clip(cy + half_h, 0, height),
                               np.clip(cx - half_w, 0, width), np.clip(cx + half_w, 0, width)], axis=1)
        area = (boxes[cut, 1] - boxes[cut, 0]) * (boxes[cut, 3] - boxes[cut, 2])
        lam[cut] = 1.0 - area / (height * width)
    return MixDraws(partners, lam, cut, boxes)


def apply(images: torch.Tensor, labels: torch.Tensor, num_classes: int, draws: MixDraws
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixed images ``[N, C, H, W]`` and soft targets ``[N, num_classes]`` (float32) for one step."""
    device = images.device
    partners = torch.from_numpy(draws.partners).to(device, non_blocking=True)
    lam = torch.from_numpy(draws.lam).to(device=device, dtype=torch.float32)
    if draws.cut.any():  # per pixel: 1 inside a CutMix box, 1 − λ everywhere in a mixup row
        h, w = images.shape[-2:]
        box = torch.from_numpy(draws.boxes).to(device)
        rows = torch.arange(h, device=device).view(1, h, 1)
        cols = torch.arange(w, device=device).view(1, 1, w)
        inside = ((rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None])
                  & (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None]))
        cut = torch.from_numpy(draws.cut).to(device).view(-1, 1, 1)
        weight = torch.where(cut, inside.float(), (1.0 - lam).view(-1, 1, 1)).unsqueeze(1)
    else:
        weight = (1.0 - lam).view(-1, 1, 1, 1)
    mixed = torch.lerp(images, images[partners], weight.to(images.dtype))  # exact at weights 0 and 1
    one_hot = F.one_hot(labels, num_classes).float()
    targets = lam[:, None] * one_hot + (1.0 - lam[:, None]) * one_hot[partners]
    return mixed, targets


class Mixer:
    """The trainer's mixing of one step's M·B batch (see the module docstring)."""

    def __init__(self, mixup: float, cutmix: float, switch_prob: float, num_classes: int, num_images: int,
                 num_views: int, seed: int, rank: int):
        self.mixup, self.cutmix, self.switch_prob = mixup, cutmix, switch_prob
        self.num_classes, self.num_images, self.num_views = num_classes, num_images, num_views
        self.seed, self.rank = seed, rank

    def draws(self, step: int, height: int, width: int) -> MixDraws:
        rng = np.random.default_rng([self.seed, self.rank, step])
        return draw(rng, self.num_images, self.num_views, height, width, self.mixup, self.cutmix, self.switch_prob)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return apply(images, labels, self.num_classes, self.draws(step, *images.shape[-2:]))
