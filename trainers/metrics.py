"""metrics.jsonl: one JSON object per line, appended (never rewritten, also across resumes).

Every line has ``kind``, ``step`` (optimizer steps done so far, all ranks together: the same
number on every rank) and ``epoch`` (``step / steps_per_epoch``, fractional), and ``time``
(seconds since this process started training). A resumed run appends after the old lines; steps
run again after the last checkpoint appear twice, and readers keep the last line of each
(kind, step).

``kind: "train"`` — every ``train.log_every`` steps and at the last step:
    loss           mean cross-entropy over all M·B·world samples, averaged over the steps since the
                   previous train line (label smoothing included when set; with train.mixup /
                   train.cutmix, against the mixed soft targets)
    lr             learning rate used by this step's update
    images_per_s   unique images per second over all ranks (B·world per step)
    samples_per_s  samples (augmented views) per second over all ranks (M·B·world per step)
    data_time      seconds per step rank 0 waited for the loader (mean since the previous line)
    step_time      seconds per step, wall clock (mean since the previous line)
    nonfinite_steps  steps skipped so far because they were not finite (only when some were,
                   with ``train.nonfinite_limit`` > 0; ``trainers/nonfinite.py``); ``loss`` is then
                   null for a line whose steps include one

``kind: "eval"`` — every ``train.eval_every`` steps (0: each epoch end) and at the last step:
    val_top1, val_top5   accuracy in % over every validation image exactly once (all ranks)
    val_loss             mean cross-entropy (no label smoothing)
    val_top1_ema, val_top5_ema, val_loss_ema
                         the same for the EMA of the weights (with ``train.ema_decay``), on the same
                         batches; ``best.pt`` still follows ``val_top1`` (the model's)
    val_images           images evaluated
    val_views            views averaged per image (``eval.views``; 1 = one centre view; combined
                         as ``eval.average`` says: mean softmax or mean logits)
    eval_time            seconds (the model and its EMA together)

``kind: "diag"`` — every ``diagnostics.every`` steps (see ``trainers/diagnostics.py`` for the
estimators). Gradient norms are of the mean-loss gradient, in image units (an image = its M views):
    grad_norm2           |G|² of the full global batch gradient (after the DDP all-reduce)
    grad_norm2_local     |G_local|² of one rank's batch (B images), mean over ranks; world > 1 only
    grad_norm2_view      |g_v|² of one view group (B images × view v) on one rank, mean over ranks
    view_grad_var        |g_v − G_local|², mean over ranks: how far one view group's gradient
                         is from the BA gradient of the same images
    view_grad_var_rel    view_grad_var / grad_norm2_local
    aug_noise_trace      tr(Σ_aug): per-image gradient covariance from augmentation alone,
                         = view_grad_var · B · M / (M − 1)
    noise_trace          tr(Σ) of the per-image BA gradient (McCandlish et al. 2018, App. A)
    noise_g2             unbiased |G|² estimate of the true gradient's squared norm
    noise_scale          B_simple = noise_trace / noise_g2, in images (of M views each)
    noise_pair           which small/large pair gave the three above: "ddp" (per-rank vs
                         all-reduced gradient, free) or "half" (half the images on one rank,
                         single process)
    noise_scale_ema      B_simple from exponential moving averages (0.9) of noise_trace and noise_g2
                         (the per-step ratio is very noisy, even negative; McCandlish recommend
                         this one; absent while either average is not positive)
    ba_var_reduction     (tr Σ + aug_noise_trace·(1 − 1/M)) / tr Σ from the same EMAs: how many
                         times smaller the BA gradient's variance is than the M=1 gradient's for
                         the same B (M if views were independent images, 1 if they added nothing)
    probe                which probe ran: "view" or "half"; probe_view: the view index

``kind: "event"`` — ``event`` is ``start`` (with ``resumed_from`` when resuming, and ``git_commit``/
``git_dirty`` of the code), ``preempted`` (SIGTERM/SIGUSR1 arrived; a checkpoint was saved),
``interrupted`` (SIGINT; a checkpoint was saved),
``stopped`` (``message`` says why; ``reason: decode_error``: a file failed to decode, a checkpoint
was saved; ``reason: nonfinite_loss``: more steps than ``train.nonfinite_limit`` were not finite),
``data_changed`` (resumed, but not bit for bit: the training set changed, DALI could not restore its
state, or the run continues on another number of ranks; ``message`` says how the data continues)
or ``end``.

A process killed while writing can leave a last line without its newline: the next run starts on a
new line, and readers skip a line that is not valid JSON.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from dali_ba.errors import ConfigError


class MetricsLogger:
    """Appends JSON lines on rank 0 (a no-op elsewhere); optional TensorBoard scalars."""

    def __init__(self, path: str | Path, enabled: bool, tensorboard_dir: Optional[str | Path] = None):
        self.enabled = enabled
        self.start = time.time()
        self._file = None
        self._tb = None
        if tensorboard_dir is not None:  # checked on every rank, so that all of them stop
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard: needs the tensorboard package "
                                  "(pip install 'dali-ba[tensorboard]')") from None
        if not enabled:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
        self._path, self._lost, self._torn = path, 0, False
        self._file = open(path, "a", buffering=1)
        if torn:  # the previous process died mid-line: keep our lines whole
            self._file.write("\n")
        if tensorboard_dir is not None:
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, kind: str, step: int, epoch: float, **values) -> dict:
        record = {"kind": kind, "step": int(step), "epoch": round(float(epoch), 6),
                  "time": round(time.time() - self.start, 3)}
        record.update({k: _clean(v) for k, v in values.items()})
        if self._file is not None:
            self._write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        return record

    def _write(self, line: str) -> None:
        """Append a line; a failed write (a full disk) loses the line, not the run: one warning says
        so, the count is given at the end, and writing goes on when it can (on a new line)."""
        try:
            self._file.write(("\n" if self._torn else "") + line)  # a failed write may have left half a line
            self._file.flush()
            self._torn = False
        except OSError as exc:
            if not self._lost:
                print(f"trainers.train: warning: cannot write {self._path} ({exc.strerror or exc}): metrics lines are "
                      "being lost; training goes on", file=sys.stderr, flush=True)
            self._lost += 1
            self._torn = True

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
            if self._lost:
                print(f"trainers.train: warning: {self._lost} metrics line(s) could not be written to {self._path}",
                      file=sys.stderr, flush=True)
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class TrainWindow:
    """The steps since the last ``train`` line: the loss summed on the device (read once per line,
    the only host sync logging costs), data-wait and step wall times."""

    def __init__(self, device: torch.device):
        self._loss = torch.zeros((), device=device)
        self.steps, self.data_time, self.step_time = 0, 0.0, 0.0

    def add(self, loss: torch.Tensor, data_time: float, step_time: float) -> None:
        self._loss += loss
        self.steps += 1
        self.data_time += data_time
        self.step_time += step_time

    def loss_sum(self) -> float:
        return float(self._loss.item())

    def row(self, loss_sum_all_ranks: float, world: int, batch_size: int, num_views: int, lr: float) -> dict:
        """The ``train`` line's values (see the module docstring); starts a new window."""
        n, t = self.steps, max(self.step_time, 1e-9)
        row = {
            "loss": loss_sum_all_ranks / (world * n),
            "lr": lr,
            "images_per_s": batch_size * world * n / t,
            "samples_per_s": batch_size * num_views * world * n / t,
            "data_time": self.data_time / n,
            "step_time": self.step_time / n,
        }
        self._loss.zero_()
        self.steps, self.data_time, self.step_time = 0, 0.0, 0.0
        return row


def _clean(v):
    """Plain JSON values: floats rounded to 6 significant digits, NaN/inf as null."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return v


def read_metrics(path: str | Path, kind: Optional[str] = None) -> list:
    """Lines of a metrics.jsonl (optionally of one kind), keeping the last line of each (kind, step)."""
    rows: dict = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a killed process
                continue
            if kind is None or row.get("kind") == kind:
                key = (row.get("kind"), row.get("step"), row.get("event"))
                rows.pop(key, None)
                rows[key] = row
    return sorted(rows.values(), key=lambda r: r["step"])


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Counts of samples whose label is among the top-k logits, one per k (k capped at #classes);
    a tensor on the logits' device (no host synchronisation)."""
    kmax = min(max(ks), logits.shape[1])
    hit = logits.topk(kmax, dim=1).indices.eq(labels[:, None])
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).double()
