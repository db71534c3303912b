"""The live process tree from /proc (Linux): whose child each process is, and its CPU time.

DALI's decoders, torchrun's workers and verify's decode process are child processes: the
benchmarks count their CPU time, gpu-check stops them, and the tests look for them."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Table = Dict[int, Tuple[int, float]]  # pid → (parent pid, user + system CPU seconds)


def _stat(pid: int) -> Optional[Tuple[int, float]]:
    """(parent pid, utime + stime in seconds) of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes() -> int:
    """This process's resident memory now (not the peak that ``getrusage`` reports)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_table() -> Table:
    """Every live process now (empty where there is no /proc)."""
    if not os.path.isdir("/proc"):
        return {}
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                table[int(name)] = info
    return table


def children(pid: int, table: Optional[Table] = None) -> List[int]:
    """The live direct children of ``pid``, in pid order."""
    table = process_table() if table is None else table
    return sorted(child for child, (parent, _) in table.items() if parent == pid)


def descendants(pid: int, table: Optional[Table] = None) -> List[int]:
    """The live descendants of ``pid``: children first, then grandchildren, …"""
    table = process_table() if table is None else table
    by_parent: Dict[int, List[int]] = {}
    for child, (parent, _) in sorted(table.items()):
        by_parent.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        found = by_parent.get(todo.pop(0), [])
        out += found
        todo += found
    return out


def descendants_cpu_seconds(pid: int) -> float:
    """CPU seconds of the live descendants of ``pid``."""
    table = process_table()
    return sum(table[child][1] for child in descendants(pid, table))
