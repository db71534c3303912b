"""Checkpoints: what a run needs to continue exactly where it stopped, written atomically.

A checkpoint is one ``torch.save``'d dict (``FORMAT``): ``step`` (optimizer steps done),
``model`` (unwrapped state dict), ``optimizer``, ``scaler`` (AMP), ``loader`` and ``rng`` (one
entry per rank: the loader's mid-epoch state and that rank's RNG states), ``config`` (the
resolved config as a dict), ``world_size``, ``best_top1``, ``schedule`` (for information: the LR
is a pure function of ``step``). Files are written to a temporary name in the same folder, fsynced,
then renamed over the target: a crash leaves the previous ``last.pt`` intact, never half of one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from dali_ba.errors import UserError

FORMAT = 1
LAST, BEST = "last.pt", "best.pt"

# Keys whose change makes a resumed run a different run (or makes the state not load).
MUST_MATCH = (
    "model.arch", "model.num_classes", "data.batch_size", "data.num_views", "data.image_size", "data.augment",
    "data.train_list", "train.epochs", "train.seed", "train.amp", "train.view_chunks",
)
MUST_MATCH_SECTIONS = ("optim", "schedule")


class ResumeError(UserError):
    """The checkpoint to resume from is missing, unreadable or from an incompatible run."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_atomic(obj: Any, path: str | Path) -> None:
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


def load(path: Path) -> Dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and IO errors all mean "not a usable checkpoint"
        raise ResumeError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a dali-ba trainer checkpoint (format {FORMAT})")
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


def check_compatible(ckpt: dict, config: dict, world: int, path: Path) -> None:
    problems = config_differences(ckpt["config"], config)
    if ckpt["world_size"] != world:
        problems.append(f"world size: checkpoint {ckpt['world_size']}, now {world} (the loader state is per rank)")
    if problems:
        raise ResumeError(
            f"cannot resume from {path}: it was written by a different run ({'; '.join(problems)}); "
            "use another train.out_dir or train.resume=none to start afresh"
        )


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(paths, env, *, step, model, optimizer, scaler, loader, monitor, config, best_top1, schedule) -> None:
    """Collective: gather every rank's loader and RNG state, rank 0 writes each of ``paths``."""
    from dataclasses import asdict

    from trainers import dist as tdist

    loader_states = tdist.gather_objects(env, loader.state_dict())
    rngs = tdist.gather_objects(env, rng_state())
    if env.is_main:
        state = {
            "format": FORMAT, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "loader": loader_states, "rng": rngs, "config": config,
            "world_size": env.world, "best_top1": best_top1, "diagnostics": monitor.state_dict(),
            "schedule": asdict(schedule), "classes": list(loader.classes),
        }
        for path in paths:
            save_atomic(state, path)
    tdist.barrier(env)
