"""Host tensors the loader copies batches into, reused once nobody holds them any more.

Every batch is copied out of DALI's output, so a batch the caller keeps never depends on how a DALI
version or executor recycles its buffers (DALI 2.4's dynamic executor, measured on the CPU, leaves
kept zero-copy outputs intact; handing them out uncopied measured within noise). On the CPU a
fresh ``torch.empty`` of a large batch (154 MB at B=64, M=4, 224², fp32) comes from ``mmap`` and
page-faults on first touch: that copy alone was ~13% of the loader's CPU time in the benchmark.
Copying into a tensor we handed out earlier avoids the faults, but only if the caller let go of
it: a buffer is reused only when no tensor outside this pool shares its memory (torch's storage
use count), so a caller that keeps batches (a list, a prefetch queue) just gets fresh memory.
CUDA tensors are cloned: torch's caching allocator already reuses GPU memory without faults.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it: always fresh


def _storage_refs(t: torch.Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata)


class ReusedBuffers:
    """``copy(src)`` → a tensor equal to ``src`` that the caller owns, in recycled memory when possible."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._pool: List[Tuple[torch.Tensor, int]] = []  # (buffer, its storage use count when idle)

    def clear(self) -> None:
        """Forget every buffer (the caller's batches stay valid). The loaders call this when an
        epoch's pipeline goes, so a loader between epochs (an ``EvalLoader`` between evaluations)
        holds no batch-sized memory. (RSS over 80 epochs creeps alike with or without it.)"""
        self._pool.clear()

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        if src.device.type != "cpu" or _use_count is None or self.capacity == 0:
            return src.clone()
        buffer = self._free_buffer(src)
        buffer.copy_(src)
        # A new tensor object on the same memory: while the caller holds it (or any view of it),
        # the storage's use count stays above the idle count and the buffer is not reused.
        return buffer.detach()

    def _free_buffer(self, like: torch.Tensor) -> torch.Tensor:
        idle = [i for i, (buf, refs) in enumerate(self._pool) if _storage_refs(buf) == refs]
        for i in idle:
            buf = self._pool[i][0]
            if buf.shape == like.shape and buf.dtype == like.dtype:
                return buf
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        entry = (buf, _storage_refs(buf))
        if len(self._pool) < self.capacity:
            self._pool.append(entry)
        elif idle:  # replace an idle buffer of another shape (e.g. the last, smaller batch)
            self._pool[idle[0]] = entry
        return buf  # pool full of batches the caller still holds: this one is not tracked
