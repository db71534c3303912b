"""Which files each rank reads, epoch by epoch, and the seeds it augments them with.

Train: one global permutation per epoch (the same on every rank, from the run seed and the
epoch), cut to a whole number of global batches and dealt round-robin to ranks — so shards are
disjoint, every rank runs the same number of steps, and the shuffle really changes each epoch
(DALI's own ``random_shuffle`` is a 1,024-sample buffer, not a permutation).
Eval: contiguous slices with no padding, so every image is counted exactly once.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def dist_rank_world() -> Tuple[int, int]:
    """(global rank, world size) of torch.distributed when initialised, else (0, 1)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency, but stay importable without it
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_shard(shard_id: Optional[int], num_shards: Optional[int]) -> Tuple[int, int]:
    """Explicit values win; otherwise the global rank and world size (never the local rank)."""
    rank, world = dist_rank_world()
    shard_id = rank if shard_id is None else int(shard_id)
    num_shards = world if num_shards is None else int(num_shards)
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards); got shard_id={shard_id}, num_shards={num_shards}")
    return shard_id, num_shards


def steps_per_epoch(num_files: int, batch_size: int, num_shards: int) -> int:
    return num_files // (batch_size * num_shards)


def train_shard_indices(
    num_files: int, batch_size: int, shard_id: int, num_shards: int, seed: int, epoch: int
) -> np.ndarray:
    """Indices of the files this rank reads in ``epoch``, in reading order (drop-last)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_files)
    used = steps_per_epoch(num_files, batch_size, num_shards) * batch_size * num_shards
    return order[:used][shard_id::num_shards]


def eval_shard_indices(num_files: int, shard_id: int, num_shards: int) -> np.ndarray:
    """A contiguous, unpadded slice: over all shards, each index exactly once."""
    start = num_files * shard_id // num_shards
    stop = num_files * (shard_id + 1) // num_shards
    return np.arange(start, stop)


def augment_seed(seed: int, shard_id: int, *position: int) -> int:
    """DALI pipeline seed: differs per rank and per starting position (epoch, step), reproducible
    from the run seed."""
    return int(np.random.SeedSequence([seed, shard_id, *position]).generate_state(1)[0] & 0x7FFFFFFF)
