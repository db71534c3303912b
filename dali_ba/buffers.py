"""Host tensors the loader assembles batches in, reused once nobody holds them any more.

The pipelines emit each view as its own output (``[B, C, H, W]``, see ``augment``); ``stack``
copies the M of them into one ``[B, M, C, H, W]`` tensor. That copy is also what makes a batch
the caller's own: it never depends on how a DALI version or executor recycles its buffers.

Two things keep the copy cheap on the CPU (measurements: benchmarks/README.md):
- Memory: a fresh ``torch.empty`` of a batch's size comes from ``mmap`` and page-faults on first
  touch. So the copy goes into a tensor handed out earlier, but only if the caller let go of it: a
  buffer is reused only when no tensor outside this pool shares its memory (torch's storage use
  count, a private API: without it every batch gets fresh memory), so a caller that keeps batches
  (a list, a prefetch queue) just gets fresh memory.
- Threads: the copy is numpy's single-threaded ``copyto``; torch's ``copy_`` wakes its OpenMP pool,
  whose threads then spin on the cores DALI's own threads are using.
CUDA views are stacked with ``torch.stack``: torch's caching allocator already reuses GPU memory.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it: always fresh
_NUMPY_DTYPES = {torch.float32, torch.float16, torch.float64, torch.uint8, torch.int32, torch.int64}


def _storage_refs(t: torch.Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata)


class ReusedBuffers:
    """``stack(views)`` → a tensor ``[B, M, ...]`` equal to ``torch.stack(views, 1)`` that the
    caller owns, in recycled memory when possible."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._pool: List[Tuple[torch.Tensor, int]] = []  # (buffer, its storage use count when idle)

    def clear(self) -> None:
        """Forget every buffer (the caller's batches stay valid); the loaders call this when their
        pipeline goes."""
        self._pool.clear()

    def stack(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        first = views[0]
        if first.device.type != "cpu":
            return torch.stack(list(views), dim=1)
        shape = (first.shape[0], len(views)) + tuple(first.shape[1:])
        tracked = _use_count is not None and self.capacity
        out = self._free_buffer(shape, first.dtype) if tracked else torch.empty(shape, dtype=first.dtype)
        if first.dtype in _NUMPY_DTYPES:
            target = out.numpy()
            for i, view in enumerate(views):
                np.copyto(target[:, i], view.numpy())
        else:  # e.g. bfloat16, which numpy lacks
            for i, view in enumerate(views):
                out[:, i].copy_(view)
        # A new tensor object on the same memory: while the caller holds it (or any view of it),
        # the storage's use count stays above the idle count and the buffer is not reused.
        return out.detach()

    def _free_buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        idle = [i for i, (buf, refs) in enumerate(self._pool) if _storage_refs(buf) == refs]
        for i in idle:
            buf = self._pool[i][0]
            if tuple(buf.shape) == shape and buf.dtype == dtype:
                return buf
        buf = torch.empty(shape, dtype=dtype)
        entry = (buf, _storage_refs(buf))
        if len(self._pool) < self.capacity:
            self._pool.append(entry)
        elif idle:  # replace an idle buffer of another shape (e.g. the last, smaller batch)
            self._pool[idle[0]] = entry
        return buf  # pool full of batches the caller still holds: this one is not tracked
