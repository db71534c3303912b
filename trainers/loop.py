"""The training loop, top to bottom: set up, resume, then fetch / agree / step / evaluate / checkpoint.

One optimizer step per batch of B unique images × M views per rank; the loss is the mean over all
M·B samples (and DDP averages the ranks); steps per epoch = N / (B · world), so with M > 1 the run
has the same steps and LR schedule as the M=1 baseline unless a scaling rule says otherwise.

Ranks agree once per step, in one small CPU collective right after each fetched its batch and
before any starts the step's DDP collectives: did every rank get its batch (a file that fails to
decode stops every rank after a checkpoint pointing at that batch), did a signal arrive
(SIGTERM/SIGUSR1: every rank checkpoints and exits 0; SIGINT: the same, exit 130), and, every
``train.log_every`` steps, the loss since the last line and the count of non-finite steps (the only
host sync for logging; ``nonfinite.py``). Set-up steps that may fail on some ranks end in one
agreement (``faults.agreed``); the early stops save a checkpoint first (``saver.py``). Faults:
docs/reliability.md.
"""
from __future__ import annotations

import gc
import os
import random
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dali_ba import BatchAugmentLoader, EvalLoader
from dali_ba.config import config_to_dict
from dali_ba.errors import ConfigError, DecodeError, LoaderOutOfMemory, LoaderStateError
from dali_ba.packed import is_packed
from dali_ba.provenance import git_commit
from trainers import checkpoint as ckpt
from trainers import dist as tdist
from trainers import outdir, resources
from trainers.config import Config, for_world
from trainers.engine import Engine, build_engine
from trainers.faults import DataFailure, agreed, gather_failure
from trainers.host_memory import keep_freed_host_memory
from trainers.metrics import MetricsLogger, TrainWindow
from trainers.run_lock import RunLock
from trainers.saver import Saver
from trainers.schedule import build_schedule
from trainers.signals import INTERRUPTED_EXIT, StopSignal

PREEMPTED = "PREEMPTED"  # written to train.out_dir after a signal-triggered checkpoint (SLURM requeues)


def endless(loader):
    """Batches across epochs: each ``for`` over the loader is one epoch (or what is left of it)."""
    while True:
        yield from loader


def build_loaders(cfg: Config):
    """The training loader and, with ``data.val_root``, the evaluation loader (labelled by the
    training set's classes)."""
    common = dict(seed=cfg.train.seed, channels_last=cfg.train.channels_last)
    loader = BatchAugmentLoader.from_config(cfg.data, **common)
    val = None
    if cfg.data.val_root:
        val = EvalLoader.from_config(cfg.data, batch_size=cfg.eval.batch_size or cfg.data.batch_size,
                                     views=cfg.eval.views, classes=loader.classes, **common)
    if 0 < cfg.model.num_classes < len(loader.classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(loader.classes)} "
                          f"classes of {cfg.data.train_root} (0 = take the number from the data)")
    return loader, val


def restore(state: dict, path: Path, engine: Engine, loader: BatchAugmentLoader, env: tdist.DistEnv, seed: int):
    """Load a checkpoint into the run: (step, best top-1, how the data resumed when not exactly).

    On another number of ranks (``data.global_batch_size``) every rank continues at the same step
    of the same epoch: the epoch's global permutation does not depend on the world size, only how
    it is dealt, so each global step reads the images it would have; augmentation draws and the
    per-rank RNG streams start afresh."""
    if state["classes"] != loader.classes:
        raise ckpt.ResumeError(f"cannot resume from {path}: its classes differ from {loader.root}'s")
    if state["world_size"] == env.world:
        try:
            resumed = loader.resume(state["loader"][env.rank])
        except LoaderStateError as exc:
            raise ckpt.ResumeError(f"cannot resume from {path}: {exc}") from None
        ckpt.set_rng_state(state["rng"][env.rank])
        message = None if resumed.exact else resumed.message
    else:
        saved = state["loader"][0]
        loader.set_epoch(saved["epoch"], saved["step"])
        reseed = int(np.random.SeedSequence([seed, env.rank, state["step"]]).generate_state(1)[0])
        random.seed(reseed), np.random.seed(reseed), torch.manual_seed(reseed)
        message = (f"resumed on {env.world} ranks from a checkpoint of {state['world_size']}: every global step "
                   f"reads the images it would have (from step {saved['step']} of epoch {saved['epoch']}), with "
                   f"fresh augmentation draws")
    engine.model.load_state_dict(state["model"])
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.scaler.load_state_dict(state["scaler"])
    engine.monitor.load_state_dict(state["diagnostics"])
    if engine.ema is not None:
        engine.ema.load_state_dict(state["ema"])
    note = None if message is None else f"{message}; model, optimizer and step {state['step']} resume from {path}"
    return state["step"], state["best_top1"], note


def eval_line(metrics: dict) -> str:
    """An evaluation's accuracy and loss (and its EMA's), for the progress bar."""
    ema = f"  val_top1_ema {metrics['val_top1_ema']:.2f}%" if "val_top1_ema" in metrics else ""
    return (f"val_top1 {metrics['val_top1']:.2f}%  val_top5 {metrics['val_top5']:.2f}%  "
            f"val_loss {metrics['val_loss']:.4f}{ema}")


def report_end(log: MetricsLogger, env: tdist.DistEnv, out: Path, step: int, epoch: float, total_steps: int,
               preempted, interrupted: bool, last_eval, skipped: int, stop: StopSignal) -> int:
    """The run's last event and line; the exit code (0, or the interrupting signal's)."""
    if interrupted:
        log.log("event", step, epoch, event="interrupted", signal=preempted)
        if env.is_main:
            print(f"trainers.train: interrupted ({preempted}) at step {step}: checkpoint saved in "
                  f"{ckpt.checkpoint_dir(out)}; run the same command again to resume", file=sys.stderr, flush=True)
        return stop.exit_code if stop.interrupted else INTERRUPTED_EXIT
    if preempted:
        log.log("event", step, epoch, event="preempted", signal=preempted)
        if env.is_main:
            (out / PREEMPTED).write_text(f"{preempted} at step {step}; resume with train.resume=auto\n")
            print(f"pre-empted ({preempted}) at step {step}: checkpoint saved in {ckpt.checkpoint_dir(out)}",
                  flush=True)
        return 0
    log.log("event", step, epoch, event="end")
    if env.is_main:
        summary = f"done: step {step}/{total_steps} (epoch {epoch:.2f})"
        if skipped:
            summary += f"; {skipped} step(s) that were not finite were skipped (train.nonfinite_limit)"
        if last_eval is not None:
            e = last_eval
            summary += f"; val_top1 {e['val_top1']:.2f}%, val_top5 {e['val_top5']:.2f}% on {e['val_images']} images"
        print(f"{summary}; outputs in {out}", flush=True)
    return 0


def fit(cfg: Config, env: tdist.DistEnv, stop: StopSignal, lock: RunLock | None = None) -> int:
    cfg = for_world(cfg, env.world)  # data.global_batch_size → this world's data.batch_size
    out = Path(cfg.train.out_dir)
    with agreed(env):  # a resume that does not fit: the same on every rank, said once
        resume_from = ckpt.resolve_resume(cfg.train.resume, out)
        state = ckpt.load(resume_from) if resume_from is not None else None
        if state is not None:
            packed = cfg.data.train_list is None and is_packed(cfg.data.train_root)
            ckpt.check_compatible(state, config_to_dict(cfg), env.world, resume_from, packed=packed)

    # -- data, model, schedule ----------------------------------------------------------------
    seed = cfg.train.seed
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    with agreed(env):
        resources.check_host_memory(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        loader, val = build_loaders(cfg)
        lr_at = build_schedule(cfg, len(loader), env.world)
    engine = build_engine(cfg, env, cfg.model.num_classes or len(loader.classes))
    steps_per_epoch = len(loader)
    stop_at = min(lr_at.total_steps, cfg.train.max_steps or lr_at.total_steps)
    step, best_top1, data_note, saved_step = 0, -1.0, None, None
    # Only now, with the data, the model and the checkpoint accepted, does the run touch out_dir
    # (rank 0 takes it; a refusal, like a resume that fails on some rank, stops every rank).
    with agreed(env):
        if state is not None:
            step, best_top1, data_note = restore(state, resume_from, engine, loader, env, seed)
            engine.guard.load_state_dict(state.get("nonfinite"))
            saved_step = step
            del state
        if env.is_main:
            size = 2 * sum(t.numel() * t.element_size() for t in engine.model.state_dict().values())
            outdir.take(cfg, lock or RunLock(out), size)
            (out / PREEMPTED).unlink(missing_ok=True)
    log = MetricsLogger(out / "metrics.jsonl", env.is_main, out / "tensorboard" if cfg.train.tensorboard else None)
    saver = Saver(cfg, env, engine, loader, lr_at, log, saved_step)

    log.log("event", step, step / steps_per_epoch, event="start", world=env.world, steps_per_epoch=steps_per_epoch,
            total_steps=lr_at.total_steps, stop_at=stop_at, resumed_from=str(resume_from) if resume_from else None,
            **(git_commit() if env.is_main else {}))
    if data_note is not None:
        log.log("event", step, step / steps_per_epoch, event="data_changed", message=data_note)
        if env.is_main:
            print(f"trainers.train: warning: {data_note}", file=sys.stderr, flush=True)
    window = TrainWindow(env.device)
    preempted, interrupted, last_eval = None, False, None

    # -- the loop --------------------------------------------------------------------------------
    def due(every: int) -> bool:  # every N steps; N = 0: at each epoch end
        return step % (every or steps_per_epoch) == 0

    def flush_window() -> None:  # collective: the loss and non-finite count since the last line
        loss_sum, bad = tdist.all_reduce_sum(env, [window.loss_sum(), engine.guard.count()])
        if window.steps:
            log_window(loss_sum, bad)
        saver.check_nonfinite(bad, step, best_top1)

    def log_window(loss_sum: float, nonfinite: float = 0.0) -> None:
        row = window.row(loss_sum, env.world, cfg.data.batch_size, cfg.data.num_views, lr_at(step - 1))
        if nonfinite:  # skipped so far, over all ranks (train.nonfinite_limit > 0)
            row["nonfinite_steps"] = int(nonfinite)
        log.log("train", step, step / steps_per_epoch, **row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.4g}", img_s=f"{row['images_per_s']:.0f}")

    with tqdm(total=stop_at, initial=step, disable=not env.is_main, desc="train", dynamic_ncols=True, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 60) as bar, closing(endless(loader)) as batches:
        while step < stop_at:
            t0 = time.perf_counter()
            resume_state = loader.state_dict()  # resumes with the batch fetched next
            try:
                batch, failure = next(batches), None
            except (DecodeError, LoaderOutOfMemory) as exc:
                batch, failure = None, exc
            log_due = window.steps > 0 and step % cfg.train.log_every == 0
            agree = tdist.all_reduce_sum(env, [float(failure is not None), *stop.flags()]
                                         + ([window.loss_sum(), engine.guard.count()] if log_due else []))
            if log_due:
                log_window(agree[3], agree[4])
                saver.check_nonfinite(agree[4], step, best_top1, resume_state)
            if agree[0] > 0:  # every rank: save the last step, with the loader at the batch that failed
                saver.stop_on_data_failure(gather_failure(env, failure), step, best_top1, resume_state,
                                           out_of_memory=isinstance(failure, LoaderOutOfMemory))
            if agree[1] > 0 or agree[2] > 0:  # the fetched batch is not trained on: the checkpoint resumes with it
                interrupted = agree[2] > 0
                preempted = stop.received or ("SIGINT" if interrupted else "a signal") + " on another rank"
                saver.save([saver.last], step, best_top1, resume_state)
                break
            images, labels = (t.to(env.device, non_blocking=True) for t in batch)
            del batch
            t_data = time.perf_counter()
            loss, diag = resources.explained_step(engine, images, labels, lr_at(step), step, saver.kept)
            step += 1
            window.add(loss, t_data - t0, time.perf_counter() - t0)
            bar.update(1)
            if diag is not None:
                log.log("diag", step, step / steps_per_epoch, **diag)

            paths = []
            if val is not None and (step == stop_at or due(cfg.train.eval_every)):
                try:
                    last_eval = engine.evaluate(val)
                except DataFailure as exc:  # every rank gets it; the training state is consistent
                    saver.stop_on_data_failure(str(exc), step, best_top1, validation=True)
                log.log("eval", step, step / steps_per_epoch, **last_eval)
                if env.is_main:
                    bar.write(f"step {step}: {eval_line(last_eval)}")
                if last_eval["val_top1"] > best_top1:
                    best_top1 = last_eval["val_top1"]
                    paths.append(saver.best)
            if step == stop_at or due(cfg.train.checkpoint_every):
                paths.append(saver.last)
            if paths:
                flush_window()  # a checkpoint never gets ahead of the train lines
                saver.save(paths, step, best_top1)
        if window.steps:  # the steps since the last train line (after a signal)
            flush_window()
    if not preempted and val is not None and last_eval is None:  # resumed a finished run: report it again
        last_eval = engine.evaluate(val)
        log.log("eval", step, step / steps_per_epoch, **last_eval)

    code = report_end(log, env, out, step, step / steps_per_epoch, lr_at.total_steps, preempted, interrupted,
                      last_eval, int(engine.guard.count()), stop)
    log.close()
    return code


def run(cfg: Config) -> int:
    """Train under torchrun or as one process; returns the exit code (0 also when pre-empted, 130
    when interrupted by SIGINT after a checkpoint)."""
    keep_freed_host_memory()  # CPU steps would otherwise page-fault their activations in anew
    env = tdist.setup(cfg.train.dist_timeout_s)
    stop = StopSignal(announce=env.is_main)
    lock = RunLock(cfg.train.out_dir)
    finished = False
    try:
        code = fit(cfg, env, stop, lock)  # model, DDP and loaders are dropped when fit returns
        finished = True
        return code
    finally:
        lock.release()
        stop.restore()
        gc.collect()
        if finished:
            tdist.shutdown(env)  # barrier, then destroy the process group
        elif env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: the other ranks may not get here
