"""A training loader's saved state: what it holds, and the checks made before continuing from it.

The state (``BatchAugmentLoader.state_dict``) records the position (``epoch``, ``step``), the DALI
checkpoint of the pipeline at that position (``dali``; ``origin``: where that pipeline's epoch 0
began), and what must match for the checkpoint to mean anything: the seed, batch, views and shard,
the settings that shape the DALI graph (``graph``: DALI calls restoring a checkpoint into another
graph undefined behaviour), the number of files and the DALI version.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from dali_ba.errors import LoaderStateError

STATE_VERSION = 1
MUST_MATCH = ("seed", "batch_size", "num_views", "shard_id", "num_shards")


@dataclass(frozen=True)
class Resumed:
    """What ``BatchAugmentLoader.resume`` did: ``exact`` (bit for bit, the very next batch), or
    not, with ``message`` saying how the data continues (for a log line)."""

    exact: bool
    message: Optional[str] = None


def check_state(state: dict, mine: dict, steps: int) -> None:
    """LoaderStateError unless ``state`` can be continued at all by the loader whose state is ``mine``."""
    if not isinstance(state, dict):
        raise LoaderStateError("not a loader state")
    if state.get("version") != STATE_VERSION:
        raise LoaderStateError(f"not a loader state of this dali-ba (version {state.get('version')!r}, "
                               f"expected {STATE_VERSION})")
    differ = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in MUST_MATCH if state.get(k) != mine[k]]
    if differ:
        raise LoaderStateError("the loader state does not match this loader (" + "; ".join(differ) + ")")
    saved, now = state.get("graph") or {}, mine["graph"]
    graph = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if graph:
        raise LoaderStateError("the loader state was saved by a pipeline with other decode or augmentation settings, "
                               f"whose random state DALI cannot restore into this one ({'; '.join(graph)}); "
                               "use the saved settings, or start afresh")
    if not 0 <= state.get("step", -1) < steps:
        raise LoaderStateError(f"the loader state's step {state.get('step')!r} is outside 0..{steps - 1}")


def inexact(state: dict, mine: dict) -> Optional[Tuple[str, bool]]:
    """Why ``state`` cannot resume bit for bit, and whether the data order can still be kept;
    None when it can."""
    if state["num_files"] != mine["num_files"]:
        return f"the training set changed ({state['num_files']} files then, {mine['num_files']} now)", False
    if state["dali_version"] != mine["dali_version"]:
        return f"saved with DALI {state['dali_version']}, now {mine['dali_version']}", True
    return None


def continuation(epoch: int, step: int, same_order: bool) -> str:
    """How the data continues after an inexact resume."""
    if same_order:
        return f"the data continues at step {step} of epoch {epoch} in the same order, with fresh augmentation draws"
    return f"the data order restarts at step {step} of epoch {epoch} with a new shuffle"
