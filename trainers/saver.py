"""The run's checkpoints, and the early stops that end in one.

A run stops early, on every rank at once, in two ways that must not lose steps: more steps were not
finite than ``train.nonfinite_limit`` allows, or a file failed to load. Either way the last
completed step is saved (unless its weights are not finite: then the last good checkpoint stays),
an event goes to ``metrics.jsonl``, and every rank raises the same one-line :class:`DataFailure`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from dali_ba import BatchAugmentLoader
from dali_ba.config import config_to_dict
from trainers import checkpoint as ckpt
from trainers import dist as tdist
from trainers import resources
from trainers.config import Config
from trainers.engine import Engine
from trainers.faults import DataFailure
from trainers.metrics import MetricsLogger
from trainers.nonfinite import nonfinite_entries
from trainers.schedule import LRSchedule


class NonFiniteLoss(DataFailure):
    """More steps had a NaN/inf loss than ``train.nonfinite_limit`` allows: every rank stops."""


def nonfinite_message(states: list, limit: int) -> Optional[str]:
    """The one line for ranks' non-finite step counts (``NonFiniteGuard.state_dict()`` each), or None
    while every count is within ``limit``."""
    seen = [s for s in states if s["count"]]
    count = int(max((s["count"] for s in seen), default=0))
    if count <= limit:
        return None
    first = min(seen, key=lambda s: s["first_step"])
    what = "gradients or BatchNorm statistics were" if math.isfinite(first["first_loss"]) else "loss was"
    return (f"the {what} not finite at step {first['first_step']} (loss {first['first_loss']:.4g})"
            + (f" and at {count - 1} more step(s)" if count > 1 else "")
            + f"; their updates were skipped (train.nonfinite_limit={limit})")


def data_failure_advice(cfg: Config, loader: BatchAugmentLoader, step: int, validation: bool = False,
                        out_of_memory: bool = False) -> str:
    """What the user can do after a file failed to load (or the loader ran out of memory) and the
    run stopped at ``step``."""
    if out_of_memory:
        return resources.hint(cfg) + "; data.prefetch and data.num_threads may change on resume"
    if validation:
        return (f"replace or remove the file(s) under {cfg.data.val_root} and run again to resume at step {step} "
                "(the evaluation that failed is not repeated)")
    if loader.packed or "://" in loader.dataset.root:
        return f"run again to resume exactly there once {loader.dataset.root} can be read"
    return (f"replace the file(s) and run again to resume exactly there, or leave them out (data.train_list= "
            f"a clean list) and run again to resume at step {step} with the epoch re-shuffled")


def _broken(entries: list) -> str:
    return ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")


class Saver:
    """Collective methods (every rank calls them at the same step): save, or save and stop.

    ``loader_state`` is this rank's loader state to save instead of the current one: the state
    before the batch in hand, so that a resume fetches that batch again."""

    def __init__(self, cfg: Config, env: tdist.DistEnv, engine: Engine, loader: BatchAugmentLoader,
                 schedule: LRSchedule, log: MetricsLogger, saved_step: Optional[int]):
        self.cfg, self.env, self.engine, self.loader, self.schedule, self.log = cfg, env, engine, loader, schedule, log
        self.last = ckpt.checkpoint_dir(Path(cfg.train.out_dir)) / ckpt.LAST
        self.best = self.last.with_name(ckpt.BEST)
        self.saved_step = saved_step  # the step self.last holds, if any

    def kept(self) -> str:
        """What the user still has, for messages."""
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return f"{self.last} (step {self.saved_step}) is kept"

    def save(self, paths: Sequence[Path], step: int, best_top1: float, loader_state: Optional[dict] = None) -> None:
        """Write the run's state to each of ``paths``; never weights that are not finite."""
        broken = nonfinite_entries(self.engine.model.state_dict())
        if broken:
            raise NonFiniteLoss(f"the model's state is not finite after step {step} ({_broken(broken)}): not saved; "
                                f"{self.kept()}; lower optim.lr or lengthen schedule.warmup_epochs")
        ckpt.save_checkpoint(paths, self.env, step=step, engine=self.engine, loader=self.loader,
                             config=config_to_dict(self.cfg), best_top1=best_top1, schedule=self.schedule,
                             loader_state=loader_state, extra={"nonfinite": self.engine.guard.state_dict()})
        if self.last in paths:
            self.saved_step = step

    def check_nonfinite(self, total: float, step: int, best_top1: float, loader_state: Optional[dict] = None) -> None:
        """Stop once more steps were not finite than train.nonfinite_limit allows; ``total``: the
        count summed over ranks (0: nothing to check, no collective)."""
        if total == 0:
            return
        states = tdist.gather_objects(self.env, self.engine.guard.state_dict())
        message = nonfinite_message(states, self.cfg.train.nonfinite_limit)
        if message is None:
            return
        broken = nonfinite_entries(self.engine.model.state_dict())
        if broken:  # e.g. BatchNorm statistics of the forward pass: the last good checkpoint stays
            outcome = f"its state is not finite ({_broken(broken)}), so it was not saved; {self.kept()}"
        else:
            self.save([self.last], step, best_top1, loader_state)
            outcome = f"saved {self.last} (its weights are finite)"
        self._stopped(step, "nonfinite_loss", message)
        raise NonFiniteLoss(f"{message}; training stopped after step {step} and {outcome}: lower optim.lr or "
                            "lengthen schedule.warmup_epochs (a new run: train.resume=none), or resume with a higher "
                            "train.nonfinite_limit to skip such steps")

    def stop_on_data_failure(self, message: str, step: int, best_top1: float, loader_state: Optional[dict] = None,
                             validation: bool = False, out_of_memory: bool = False) -> None:
        """Checkpoint the last completed step (the loader at the batch that failed) and stop."""
        self.save([self.last], step, best_top1, loader_state)
        self._stopped(step, "decode_error", message)
        advice = data_failure_advice(self.cfg, self.loader, step, validation, out_of_memory)
        raise DataFailure(f"{message}; training stopped after step {step} and saved {self.last}: {advice}") from None

    def _stopped(self, step: int, reason: str, message: str) -> None:
        self.log.log("event", step, step / len(self.loader), event="stopped", reason=reason, message=message)
        self.log.close()
