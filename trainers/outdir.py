"""``train.out_dir``: checked before any work, then taken by one run.

``check`` (``python -m trainers.train --check``, no torch): not a file, not under one, writable and
not full (a real write is tried), not inside a data folder (it would become a class folder there),
not held by a live run. ``take`` (rank 0, once the data, the model and the checkpoint are accepted):
the lock, the same checks again, room for three checkpoints (two kept, one being written), stale
temporaries of a killed writer removed, ``config.yaml`` written.
"""
from __future__ import annotations

from pathlib import Path

from dali_ba.config import save_config
from dali_ba.errors import ConfigError, UserError
from dali_ba.outputs import check_free_space, check_output_dir, inside
from trainers import checkpoint as ckpt
from trainers.run_lock import RunDirInUse, RunLock, held_by

SLACK_BYTES = 1 << 20


def check(cfg) -> Path:
    """UserError (one line) for an out_dir this run cannot use; takes nothing, writes nothing that stays."""
    out = check_output_dir(cfg.train.out_dir, "train.out_dir")
    for key in ("train_root", "val_root"):
        root = getattr(cfg.data, key)
        if root and "://" not in str(root) and inside(out, root):
            raise ConfigError(f"train.out_dir {out} is inside data.{key} {root}: the run's folder would be read "
                              "as a class folder; put it elsewhere")
    holder = held_by(out)
    if holder is not None:
        raise RunDirInUse(f"train.out_dir {out} is in use by another run ({holder}); wait for it to end, stop it, "
                          "or use another train.out_dir")
    return out


def take(cfg, lock: RunLock, checkpoint_bytes: int) -> Path:
    """Rank 0: lock ``out_dir`` and make it ready; UserError if it cannot be used."""
    out = check(cfg)
    check_free_space(out, 3 * checkpoint_bytes + SLACK_BYTES, f"train.out_dir {out} (checkpoints of about "
                     f"{checkpoint_bytes / 1e3:,.0f} kB)")
    lock.acquire()
    ckpt.remove_stale_temporaries(ckpt.checkpoint_dir(out))  # left by a process killed mid-write
    try:
        save_config(cfg, out / "config.yaml")
    except OSError as exc:
        raise UserError(f"cannot write {out / 'config.yaml'}: {exc.strerror or exc}") from None
    return out
