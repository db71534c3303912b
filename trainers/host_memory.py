"""Keep freed host memory in the process instead of handing it back to the kernel every step.

Why: glibc's malloc serves large blocks (above ``M_MMAP_THRESHOLD``) with fresh ``mmap`` calls
and trims the top of its heap when more than ``M_TRIM_THRESHOLD`` is free, so a CPU training step
that allocates and frees the same tens of megabytes of activations page-faults all of them in
again, step after step: the kernel zeroes every page. Raising both thresholds keeps that memory
in the process (the measured effect is in docs/science.md); the price is that the process keeps
its peak heap.

PyTorch's own performance guide recommends jemalloc or tcmalloc for the same reason; this does the
cheap part of that with no extra library. It changes nothing when the user chose an allocator
(``LD_PRELOAD``) or set glibc's ``MALLOC_*`` tunables themselves, and it is a no-op off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest M_MMAP_THRESHOLD glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): blocks up to 32 MiB
# come from the heap and are reused; larger ones still go straight to mmap.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024  # give memory back only when over 1 GiB of the heap top is free


def user_chose_allocator() -> bool:
    """True when the environment already configures malloc (a preloaded allocator or glibc tunables)."""
    if os.environ.get("LD_PRELOAD"):
        return True
    return any(key.startswith("MALLOC_") for key in os.environ) or "GLIBC_TUNABLES" in os.environ


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; returns whether it did.

    Call once at the start of a training process (not at import: it is process-wide state).
    """
    if user_chose_allocator():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
