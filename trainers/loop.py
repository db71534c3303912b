"""The training loop, top to bottom: set up, resume, then step / log / evaluate / checkpoint.

One optimizer step per batch of B unique images × M views per rank; the loss is the mean over all
M·B samples (and DDP averages the ranks); steps per epoch = N / (B · world), so with M > 1 the run
has the same steps and LR schedule as the M=1 baseline unless a scaling rule says otherwise.

Faults (docs/reliability.md): a signal (SIGTERM/SIGUSR1) sets a flag that the per-step collective
carries, so every rank checkpoints after the same step and exits 0. A file that fails to decode
stops every rank after a checkpoint of the last completed step whose loader state points at the
failing batch (one more tiny collective per step when distributed, right after the batch is
fetched, before any rank starts the step's DDP collectives). Resuming after the training set
changed (a file left out) keeps the model, optimizer and step and restarts the epoch's order.
"""
from __future__ import annotations

import gc
import random
import signal
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dali_ba import BatchAugmentLoader, EvalLoader
from dali_ba.config import Config, ConfigError, config_to_dict, save_config
from dali_ba.dataset import align_classes
from dali_ba.errors import DecodeError, StaleLoaderState
from trainers import checkpoint as ckpt
from trainers import dist as tdist
from trainers.diagnostics import GradNoiseMonitor
from trainers.evaluate import evaluate
from trainers.faults import DataFailure, gather_failure
from trainers.host_memory import keep_freed_host_memory
from trainers.metrics import MetricsLogger
from trainers.models import build_model
from trainers.optim import build_optimizer, set_lr
from trainers.schedule import build_schedule

PREEMPTED = "PREEMPTED"  # written to train.out_dir after a signal-triggered checkpoint (SLURM requeues)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) set a flag; the loop saves and exits at a step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def endless(loader):
    """Batches across epochs: each ``for`` over the loader is one epoch (or what is left of it).
    Closing this generator closes the loader's epoch, which keeps its state for a checkpoint."""
    while True:
        with closing(iter(loader)) as epoch:
            yield from epoch


def forward_backward(model, images, labels, loss_fn, scaler, chunks: int, B: int, M: int, memory_format):
    """Backward of the mean loss over all M·B samples. With ``chunks`` > 1 the batch is split
    view-major (each chunk: all B images, M/chunks views each) and gradients accumulate: less
    activation memory, and BatchNorm statistics per chunk (ghost batch norm)."""
    if chunks == 1:
        parts = [(images, labels)]
    else:
        x, y, m = images.view(B, M, *images.shape[1:]), labels.view(B, M), M // chunks
        parts = [(x[:, c * m:(c + 1) * m].flatten(0, 1).contiguous(memory_format=memory_format),
                  y[:, c * m:(c + 1) * m].flatten()) for c in range(chunks)]
    total = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(parts):
        no_sync = model.no_sync() if i < len(parts) - 1 and isinstance(model, DDP) else nullcontext()
        with no_sync:
            loss = loss_fn(x, y) / len(parts)
            scaler.scale(loss).backward()
        total += loss.detach().float()
    return total


def fit(cfg: Config, env: tdist.DistEnv, stop: StopSignal) -> int:
    out = Path(cfg.train.out_dir)
    resume_from = ckpt.resolve_resume(cfg.train.resume, out)  # every rank, before any collective
    state = ckpt.load(resume_from) if resume_from is not None else None
    if state is not None:
        ckpt.check_compatible(state, config_to_dict(cfg), env.world, resume_from)

    # -- data, model, optimizer ---------------------------------------------------------------
    seed = cfg.train.seed
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    loader = BatchAugmentLoader.from_config(cfg.data, seed=seed, channels_last=cfg.train.channels_last)
    val = None
    if cfg.data.val_root:
        val = EvalLoader.from_config(cfg.data, batch_size=cfg.eval.batch_size, views=cfg.eval.views,
                                     channels_last=cfg.train.channels_last, seed=seed)
        val.dataset = align_classes(val.dataset, loader.classes, cfg.data.train_root, cfg.data.val_root)
    if 0 < cfg.model.num_classes < len(loader.classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(loader.classes)} "
                          f"classes of {cfg.data.train_root} (0 = take the number from the data)")
    B, M, K = cfg.data.batch_size, cfg.data.num_views, cfg.train.view_chunks
    steps_per_epoch = len(loader)
    model = build_model(cfg.model.arch, cfg.model.num_classes or len(loader.classes))
    model = model.to(env.device, memory_format=fmt)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16")
    amp_dtype = AMP_DTYPES[cfg.train.amp]
    autocast = lambda: torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    lr_at = build_schedule(cfg, steps_per_epoch, env.world)
    stop_at = min(lr_at.total_steps, cfg.train.max_steps or lr_at.total_steps)
    monitor = GradNoiseMonitor(cfg.diagnostics.every, B, M, env.world)

    # -- resume -------------------------------------------------------------------------------
    step, best_top1, data_changed = 0, -1.0, None
    if state is not None:
        if state["classes"] != loader.classes:
            raise ckpt.ResumeError(f"cannot resume from {resume_from}: its classes differ from {cfg.data.train_root}'s")
        saved_loader = state["loader"][env.rank]
        # Where the data continues when the loader state cannot be restored exactly (below).
        epoch_at, in_epoch = divmod(state["step"], steps_per_epoch)
        if isinstance(saved_loader, dict) and saved_loader.get("num_files") not in (None, len(loader.dataset)):
            # The training set changed (e.g. a broken image left out): its shuffles are not the
            # checkpoint's any more. Continue at the same step, in a fresh order of the same epoch.
            loader.set_epoch(epoch_at, step=in_epoch)
            data_changed = (f"the training set changed since {resume_from} ({saved_loader['num_files']} files then, "
                            f"{len(loader.dataset)} now): model, optimizer and step {state['step']} resume; the data "
                            f"order restarts at step {in_epoch} of epoch {epoch_at} with a new shuffle (not bit-exact)")
        else:
            try:
                loader.load_state_dict(saved_loader)
            except StaleLoaderState as exc:  # same data, older dali-ba: same order, fresh augmentation draws
                loader.set_epoch(epoch_at, step=in_epoch)
                data_changed = (f"{resume_from}: {exc}: model, optimizer and step {state['step']} resume; the data "
                                f"continues at step {in_epoch} of epoch {epoch_at} in the same order, with fresh "
                                f"augmentation draws (not bit-exact)")
            except (ValueError, KeyError, TypeError) as exc:  # another loader or data set
                raise ckpt.ResumeError(f"cannot resume from {resume_from}: {exc}") from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        monitor.load_state_dict(state["diagnostics"])
        ckpt.set_rng_state(state["rng"][env.rank])
        step, best_top1 = state["step"], state["best_top1"]
        del state
    # Only now, with the data, the model and the checkpoint accepted, does the run touch out_dir.
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / PREEMPTED).unlink(missing_ok=True)
        ckpt.remove_stale_temporaries(ckpt.checkpoint_dir(out))  # left by a process killed mid-write
        save_config(cfg, out / "config.yaml")
    log = MetricsLogger(out / "metrics.jsonl", env.is_main, out / "tensorboard" if cfg.train.tensorboard else None)
    ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None) if env.distributed else model
    monitor.attach(ddp)
    # Compiled once for the training batch shape and once for evaluation (eval mode, the unwrapped
    # model); the diagnostics' probes (other shapes, a few calls) run eagerly.
    net = torch.compile(ddp) if cfg.train.compile else ddp
    eval_net = torch.compile(model) if cfg.train.compile else model

    def loss_fn(x, y, net=net):
        with autocast():
            return criterion(net(x).float(), y)

    def eager_loss_fn(x, y):
        return loss_fn(x, y, net=ddp)

    def save(paths, loader_state=None):
        ckpt.save_checkpoint(paths, env, step=step, model=model, optimizer=optimizer, scaler=scaler, loader=loader,
                             monitor=monitor, config=config_to_dict(cfg), best_top1=best_top1, schedule=lr_at,
                             loader_state=loader_state)

    def stop_on_data_failure(message: str, loader_state=None, validation: bool = False):
        """Every rank: checkpoint the last completed step (the loader at the batch that failed), stop."""
        last_pt = ckpt.checkpoint_dir(out) / ckpt.LAST
        save([last_pt], loader_state)
        log.log("event", step, step / steps_per_epoch, event="stopped", reason="decode_error", message=message)
        log.close()
        if validation:
            advice = (f"replace or remove the file(s) under {cfg.data.val_root} and run again to resume at step {step} "
                      "(the evaluation that failed is not repeated)")
        else:
            advice = (f"replace the file(s) and run again to resume exactly there, or leave them out (data.train_list= "
                      f"a clean list) and run again to resume at step {step} with the epoch re-shuffled")
        raise DataFailure(f"{message}; training stopped after step {step} and saved {last_pt}: {advice}") from None

    log.log("event", step, step / steps_per_epoch, event="start", world=env.world, steps_per_epoch=steps_per_epoch,
            total_steps=lr_at.total_steps, stop_at=stop_at, resumed_from=str(resume_from) if resume_from else None)
    if data_changed is not None:
        log.log("event", step, step / steps_per_epoch, event="data_changed", message=data_changed)
        if env.is_main:
            print(f"trainers.train: warning: {data_changed}", file=sys.stderr, flush=True)
    loss_sum, n_steps, data_time, step_time = torch.zeros((), device=env.device), 0, 0.0, 0.0
    preempted, last_eval = None, None

    # -- the loop --------------------------------------------------------------------------------
    def due(every: int) -> bool:  # every N steps; N = 0: at each epoch end
        return step % (every or steps_per_epoch) == 0

    with tqdm(total=stop_at, initial=step, disable=not env.is_main, desc="train", dynamic_ncols=True, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 60) as bar, closing(endless(loader)) as batches:
        while step < stop_at:
            t0 = time.perf_counter()
            resume_state = loader.state_dict()  # resumes with the batch fetched next (~0.1 ms)
            try:
                batch, failure = next(batches), None
            except DecodeError as exc:
                batch, failure = None, exc
            # Before any rank starts this step's collectives: did every rank get its batch?
            if tdist.all_reduce_sum(env, [float(failure is not None)])[0] > 0:
                stop_on_data_failure(gather_failure(env, failure), resume_state)
            images, labels = (t.to(env.device, non_blocking=True) for t in batch)
            del batch
            t_data = time.perf_counter()
            lr = lr_at(step)
            set_lr(optimizer, lr)
            diagnose = monitor.due(step)
            if diagnose:
                monitor.probe(ddp, images, labels, eager_loss_fn, scaler.get_scale() if scaler.is_enabled() else 1.0)
            loss_sum += forward_backward(ddp, images, labels, loss_fn, scaler, K, B, M, fmt)
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            diag = monitor.measure(ddp, env) if diagnose else None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step, n_steps = step + 1, n_steps + 1
            bar.update(1)

            # One small CPU collective per step: the stop flag (+ the loss on logging steps).
            last = step >= stop_at
            log_now = step % cfg.train.log_every == 0 or last
            reduced = tdist.all_reduce_sum(env, [float(stop.received is not None)] + ([loss_sum.item()] if log_now else []))
            if reduced[0] > 0 and not last:
                preempted = stop.received or "signal on another rank"
            data_time += t_data - t0
            step_time += time.perf_counter() - t0
            epoch = step / steps_per_epoch
            if log_now:
                row = log.log("train", step, epoch, loss=reduced[1] / (env.world * n_steps), lr=lr,
                              images_per_s=B * env.world * n_steps / step_time,
                              samples_per_s=B * M * env.world * n_steps / step_time,
                              data_time=data_time / n_steps, step_time=step_time / n_steps)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{row['images_per_s']:.0f}")
                loss_sum.zero_()
                n_steps, data_time, step_time = 0, 0.0, 0.0
            if diag is not None:
                log.log("diag", step, epoch, **diag)

            paths = []
            if val is not None and (last or due(cfg.train.eval_every)):
                try:
                    last_eval = evaluate(eval_net, val, env, autocast, fmt)
                except DataFailure as exc:  # every rank gets it; the training state is consistent
                    stop_on_data_failure(str(exc), validation=True)
                log.log("eval", step, epoch, **last_eval)
                if env.is_main:
                    bar.write(f"step {step}: val_top1 {last_eval['val_top1']:.2f}%  "
                              f"val_top5 {last_eval['val_top5']:.2f}%  val_loss {last_eval['val_loss']:.4f}")
                if last_eval["val_top1"] > best_top1:
                    best_top1 = last_eval["val_top1"]
                    paths.append(ckpt.checkpoint_dir(out) / ckpt.BEST)
            if last or preempted or due(cfg.train.checkpoint_every):
                paths.append(ckpt.checkpoint_dir(out) / ckpt.LAST)
            if paths:
                save(paths)
            if preempted:
                break
    if not preempted and val is not None and last_eval is None:  # resumed a finished run: report it again
        last_eval = evaluate(eval_net, val, env, autocast, fmt)
        log.log("eval", step, step / steps_per_epoch, **last_eval)

    if preempted:
        log.log("event", step, step / steps_per_epoch, event="preempted", signal=preempted)
        if env.is_main:
            (out / PREEMPTED).write_text(f"{preempted} at step {step}; resume with train.resume=auto\n")
            print(f"pre-empted ({preempted}) at step {step}: checkpoint saved in {ckpt.checkpoint_dir(out)}", flush=True)
    else:
        log.log("event", step, step / steps_per_epoch, event="end")
        if env.is_main:
            summary = f"done: step {step}/{lr_at.total_steps} (epoch {step / steps_per_epoch:.2f})"
            if last_eval is not None:
                e = last_eval
                summary += f"; val_top1 {e['val_top1']:.2f}%, val_top5 {e['val_top5']:.2f}% on {e['val_images']} images"
            print(f"{summary}; outputs in {out}", flush=True)
    log.close()
    return 0


def run(cfg: Config) -> int:
    """Train under torchrun or as one process; returns the exit code (0 also when pre-empted)."""
    keep_freed_host_memory()  # CPU steps would otherwise page-fault their activations in anew
    env = tdist.setup(cfg.train.dist_timeout_s)
    stop = StopSignal()
    finished = False
    try:
        code = fit(cfg, env, stop)  # model, DDP and loaders are dropped when fit returns
        finished = True
        return code
    finally:
        stop.restore()
        gc.collect()
        if finished:
            tdist.shutdown(env)  # barrier, then destroy the process group
        elif env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: the other ranks may not get here
