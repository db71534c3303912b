"""torch.distributed in a few functions, with a single-process fallback (rank 0 of 1, no group).

torchrun (or SLURM + torchrun) sets RANK, WORLD_SIZE and LOCAL_RANK; that is all we read.
Backend: NCCL when CUDA is available, gloo otherwise. Small control messages (the stop flag,
logged scalars, checkpoint pieces) go through a gloo group on CPU tensors, so they never force a
GPU synchronisation and work the same under both backends.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group
    control: Any = None  # gloo group for CPU control messages (the default group when it is gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(timeout_s: int = 600) -> DistEnv:
    """Join the process group torchrun describes, or return a single-process environment."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not launched_by_torchrun():
        return DistEnv(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    # The gloo control group needs the timeout too: without one it would wait 30 min (torch's default
    # for new groups) for a rank that died, instead of train.dist_timeout_s.
    timeout = timedelta(seconds=timeout_s)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, control)


def all_reduce_sum(env: DistEnv, values: Sequence[float]) -> List[float]:
    """Sum a few Python floats over all ranks (one small CPU collective)."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, group=env.control)
    return t.tolist()


def gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world
    dist.all_gather_object(out, obj, group=env.control)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.control)


def shutdown(env: DistEnv) -> None:
    """Barrier, then destroy the process group. Call after dropping DDP and loader references:
    gloo threads still alive at interpreter teardown can abort a rank ("terminate called without
    an active exception")."""
    if env.distributed and dist.is_initialized():
        dist.barrier(group=env.control)
        if env.control is not dist.group.WORLD:
            dist.destroy_process_group(env.control)
        dist.destroy_process_group()
        env.backend, env.control = None, None
