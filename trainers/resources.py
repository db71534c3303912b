"""Running out of memory: refused before the run when it cannot fit, and one line with a hint when it does not.

A batch holds B·M images of image_size² pixels, as float32 (or float16) on the host — once in every
prefetched DALI batch and once in the loader's copy — and then on the device with the network's
activations, which grow with B·M too. ``check_host_memory`` refuses a run whose loader batches alone
would not fit in this machine's memory (``data.image_size=100000`` is 120 GB an image). Out of
memory during the run (DALI's ``std::bad_alloc``, torch's CPU allocator, CUDA) becomes one line that
names the batch shape, where it ran out, the steps that are lost, and the knobs that trade memory
for time: ``train.view_chunks`` (the M views in chunks, gradients accumulated), ``train.amp``,
``train.channels_last``, ``data.batch_size``, ``data.image_size``, ``data.prefetch``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from dali_ba.errors import UserError


class OutOfMemory(UserError):
    """The run ran out of host or device memory; the message names the batch and what to change."""


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
              "cudaerrormemoryallocation", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(__import__("torch"), "OutOfMemoryError", None), MemoryError) if t)
    return isinstance(exc, oom_types) or any(w in str(exc).lower() for w in _OOM_WORDS)


def batch_bytes(cfg) -> int:
    """Bytes of one rank's loader output: B·M images of 3·image_size² values."""
    d = cfg.data
    return d.batch_size * d.num_views * 3 * d.image_size ** 2 * (2 if d.dtype == "float16" else 4)


def describe_batch(cfg) -> str:
    d = cfg.data
    return (f"a batch of B={d.batch_size} images × M={d.num_views} views of {d.image_size}×{d.image_size} px "
            f"({batch_bytes(cfg) / 1e9:.3g} GB as {d.dtype})")


def hint(cfg) -> str:
    chunks = cfg.train.view_chunks
    larger = [c for c in range(chunks + 1, cfg.data.num_views + 1) if cfg.data.num_views % c == 0]
    views = (f"train.view_chunks={larger[0]} (the M views in chunks, gradients accumulated)" if larger
             else "train.view_chunks (already one view per chunk)")
    amp = ", train.amp=bf16 or fp16" if cfg.train.amp == "off" else ""
    return (f"use less memory per step: {views}{amp}, or a smaller data.batch_size or data.image_size "
            f"(data.global_batch_size over more ranks); the loader's share: data.prefetch, data.num_threads")


def _total_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def check_host_memory(cfg, local_world: int = 1) -> None:
    """OutOfMemory when the loader batches of ``local_world`` ranks alone exceed this machine's memory."""
    total = _total_memory()
    held = batch_bytes(cfg) * (cfg.data.prefetch + 2) * local_world  # DALI's queue, our copy, the step's
    if total is not None and held > total:
        raise OutOfMemory(f"{describe_batch(cfg)}: {local_world} rank(s) × {cfg.data.prefetch + 2} batches in flight "
                          f"need {held / 1e9:.3g} GB, this machine has {total / 1e9:.3g} GB; {hint(cfg)}")


def out_of_memory(exc: BaseException, cfg, where: str, lost: str) -> OutOfMemory:
    """The one line for ``exc`` (an out-of-memory error met ``where``), with the batch and the hint."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if len(first) > 160:
        first = first[:160] + "..."
    where = f" {where}" if where else ""
    return OutOfMemory(f"out of memory{where} ({type(exc).__name__}: {first}) with {describe_batch(cfg)}; "
                       f"{lost}; {hint(cfg)}")


def explained_step(engine, images, labels, lr: float, step: int, kept: Callable[[], str]):
    """``engine.step``, with running out of memory turned into one line that names the batch, says
    which checkpoint is kept (``kept()``, called only then) and gives the hint."""
    try:
        return engine.step(images, labels, lr, step)
    except Exception as exc:  # noqa: BLE001 - only running out of memory becomes a line with a hint
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(exc, engine.cfg, f"in training step {step + 1}",
                            f"the steps since the last checkpoint are lost; {kept()}") from None
