"""Checkpoints: what a run needs to continue exactly where it stopped, written atomically.

A checkpoint is one ``torch.save``'d dict (``FORMAT``): ``step`` (optimizer steps done),
``model`` (unwrapped state dict), ``optimizer``, ``scaler`` (AMP), ``loader`` and ``rng`` (one
entry per rank: the loader's mid-epoch state and that rank's RNG states), ``config`` (the
resolved config as a dict), ``world_size``, ``best_top1``, ``schedule`` (for information: the LR
is a pure function of ``step``), ``ema`` (the weight average's state dict with ``train.ema_decay``,
else None). Files are written to a temporary name in the same folder, fsynced,
then renamed over the target: a crash leaves the previous ``last.pt`` intact, never half of one.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from dali_ba.errors import UserError

# torch and numpy are imported where they are used: resolve_resume runs before the trainer
# imports torch, so that a wrong path fails in a fraction of a second.

FORMAT = 1
REQUIRED_KEYS = ("step", "model", "optimizer", "scaler", "loader", "rng", "config", "world_size", "best_top1",
                 "diagnostics", "classes")
LAST, BEST = "last.pt", "best.pt"

# Keys whose change makes a resumed run a different run (or makes the state not load).
# The training set itself may change (data.train_root / data.train_list, e.g. a broken image left
# out): the classes must stay the same, and the loader then restarts the epoch's order (loop.py).
MUST_MATCH = (
    "data.batch_size", "data.global_batch_size", "data.num_views", "data.image_size", "data.augment", "train.epochs",
    "train.seed", "train.amp", "train.view_chunks", "train.mixup", "train.cutmix", "train.mixup_switch_prob",
    "train.ema_decay",
)
MUST_MATCH_SECTIONS = ("model", "optim", "schedule")


class ResumeError(UserError):
    """The checkpoint to resume from is missing, unreadable or from an incompatible run."""


class CheckpointWriteError(UserError):
    """Rank 0 could not write a checkpoint (a full disk, a folder that went away)."""

    all_ranks = True


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def remove_stale_temporaries(directory: str | Path) -> List[Path]:
    """Delete the temporary files of writes that never finished (a process killed inside
    ``save_atomic``: ``.<name>.tmp-<pid>``), unless that process is still alive on this host."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # its writer still runs (another run in the same folder?): leave it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def save_atomic(obj: Any, path: str | Path) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def resolve_resume(resume: str, out_dir: str | Path) -> Optional[Path]:
    """The checkpoint file to resume from, or None for a fresh start.

    ``auto``: ``out_dir/checkpoints/last.pt`` when it exists; ``none``: never resume; a run
    directory (its ``checkpoints/last.pt``); or a checkpoint file. A path that does not exist
    is an error naming it."""
    if resume == "none":
        return None
    if resume == "auto":
        last = checkpoint_dir(out_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"train.resume: {resume} does not exist")
    if path.is_file():
        return path
    for candidate in (checkpoint_dir(path) / LAST, path / LAST):
        if candidate.is_file():
            return candidate
    raise ResumeError(f"train.resume: no checkpoint in {resume} (looked for checkpoints/{LAST} and {LAST})")


def _numpy_globals() -> list:
    """What the numpy values of a checkpoint (RNG states, counters) unpickle through."""
    import numpy as np

    kinds = (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
             np.float16, np.float32, np.float64)
    return [np.ndarray, np.dtype, np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0],
            *{type(np.dtype(k)) for k in kinds}]


def load(path: Path) -> Dict[str, Any]:
    """The checkpoint at ``path``, unpickled with torch's ``weights_only`` loader: tensors, plain
    Python values and numpy arrays only, so a crafted file cannot run code when it is resumed."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and IO errors all mean "not a usable checkpoint"
        text = str(exc)
        if "Unsupported global" in text or "weights_only" in text.split("\n", 1)[0]:
            culprit = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line),
                           text.splitlines()[0] if text else type(exc).__name__)
            raise ResumeError(f"{path} holds objects a dali-ba checkpoint does not ({culprit[:160]}): not loaded, "
                              "since unpickling them could run code; resume only from checkpoints dali-ba "
                              "wrote") from None
        detail = (text.strip().splitlines() or [""])[0]
        raise ResumeError(f"cannot read checkpoint {path}: {type(exc).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise ResumeError(f"{path} is not a dali-ba trainer checkpoint (format {FORMAT})")
    if ckpt["format"] != FORMAT:
        age = "an older" if isinstance(ckpt["format"], int) and ckpt["format"] < FORMAT else "another"
        raise ResumeError(
            f"{path} has checkpoint format {ckpt['format']!r}, written by {age} dali-ba; this one reads "
            f"format {FORMAT}: resume it with the dali-ba that wrote it, or start afresh "
            "(train.resume=none or another train.out_dir)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ResumeError(f"{path} is an incomplete checkpoint (no {', '.join(missing)}); start afresh with "
                          "train.resume=none or another train.out_dir")
    return ckpt


def _flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> List[str]:
    """``key: checkpoint X, now Y`` for each key that matters and differs."""
    a, b = _flatten(saved), _flatten(current)
    keys = [k for k in sorted(set(a) | set(b)) if k in MUST_MATCH or k.split(".")[0] in MUST_MATCH_SECTIONS]
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_compatible(ckpt: dict, config: dict, world: int, path: Path, packed: bool = False) -> None:
    """ResumeError unless ``config`` on ``world`` ranks can continue ``ckpt``. Another world size is
    fine when the run fixes its global batch (``data.global_batch_size``), for loose files."""
    problems = config_differences(ckpt["config"], config)
    elastic = config["data"].get("global_batch_size", 0) > 0
    if ckpt["world_size"] != world:
        problems = [p for p in problems if not (elastic and p.startswith("data.batch_size:"))]
        if not elastic:
            problems.append(f"world size: checkpoint {ckpt['world_size']}, now {world} (set data.global_batch_size "
                            "to resume a run on another number of ranks)")
        elif packed:
            problems.append(f"world size: checkpoint {ckpt['world_size']}, now {world}: a packed dataset's reader "
                            "cannot re-deal the rest of its epoch to another number of ranks (resume on "
                            f"{ckpt['world_size']} ranks, or train from loose files)")
    if problems:
        raise ResumeError(
            f"cannot resume from {path}: it was written by a different run ({'; '.join(problems)}); "
            "use another train.out_dir or train.resume=none to start afresh"
        )


def rng_state() -> dict:
    """This process's RNG states; for CUDA only the current device's (a resume on a node that sees
    another number of GPUs must still find its own)."""
    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(paths, env, *, step, engine, loader, config, best_top1, schedule,
                    loader_state: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    """Collective: gather every rank's loader and RNG state, rank 0 writes each of ``paths``.
    ``loader_state``: this rank's loader state to save instead of the loader's current one;
    ``extra``: more entries (optional ones, which ``load`` does not require)."""
    from trainers import dist as tdist

    loader_states = tdist.gather_objects(env, loader.state_dict() if loader_state is None else loader_state)
    rngs = tdist.gather_objects(env, rng_state())
    if env.is_main:
        state = {
            "format": FORMAT, "step": step, "model": engine.model.state_dict(),
            "optimizer": engine.optimizer.state_dict(), "scaler": engine.scaler.state_dict(), "loader": loader_states,
            "rng": rngs, "config": config, "world_size": env.world, "best_top1": best_top1,
            "diagnostics": engine.monitor.state_dict(), "schedule": asdict(schedule), "classes": list(loader.classes),
            "ema": engine.ema.state_dict() if engine.ema is not None else None,
            **(extra or {}),
        }
    failure = None
    if env.is_main:
        try:
            for path in paths:
                save_atomic(state, path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            failure = CheckpointWriteError(
                f"cannot write checkpoint {path}: {reason}; training stopped after step {step}, the checkpoint "
                f"that was there before is intact: {'free some space' if 'space' in reason else 'fix that'} "
                "and run again to resume from it")
    from trainers.faults import agreed  # every rank learns of rank 0's failure (it also waits for the write)

    with agreed(env):
        if failure is not None:
            raise failure
