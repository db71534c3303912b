"""What every benchmark record carries: the machine, the versions, the git commit, the command.

``write_record(path, record)`` adds those and writes JSON; results in ``benchmarks/results/``
are traceable to the code that produced them (``git_commit``; ``git_dirty`` when the working tree
had uncommitted changes).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from dali_ba.provenance import git_commit

ENV_KEYS = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "MALLOC_ARENA_MAX", "CUDA_VISIBLE_DEVICES")


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def machine_info() -> dict:
    info = {
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                           "cuda": torch.version.cuda}
    except ImportError:  # pragma: no cover
        pass
    try:
        info["transparent_hugepages"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    from importlib import metadata

    from dali_ba import __version__

    out = {"dali_ba": __version__}
    for dist, key in (("nvidia-dali-cuda120", "dali"), ("nvidia-dali-cuda130", "dali"), ("torch", "torch"),
                      ("torchvision", "torchvision"), ("pillow", "pillow"), ("numpy", "numpy")):
        try:
            out.setdefault(key, metadata.version(dist))
        except metadata.PackageNotFoundError:
            pass
    return out


def command_line() -> str:
    """The command as the user typed it (``dali-ba bench …`` or ``python -m …``)."""
    argv = sys.argv[1:]
    prefix = "dali-ba" if Path(sys.argv[0]).name in ("dali-ba", "cli.py", "__main__.py") or argv[:1] == ["bench"] \
        else f"python {sys.argv[0]}"
    return " ".join([prefix, *(shlex.quote(a) for a in argv)])


def new_record(kind: str) -> dict:
    """The fields every record starts with; the benchmark adds its settings and results."""
    return {"kind": kind, "command": command_line(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **git_commit(), "machine": machine_info(), "versions": versions(),
            "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}, "load_average": load_average()}


def write_record(path: str | Path, record: dict) -> None:
    """Write ``record`` as JSON (its parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # formats matplotlib writes by the file name


def check_writable(path: Optional[str | Path], flag: str, suffixes: Optional[tuple] = None) -> None:
    """UserError naming ``flag`` unless ``path`` can be written (a real write is tried in its
    folder: read-only places and full disks fail here), checked before any measuring, so a bad
    output path never throws a measurement away."""
    from dali_ba.outputs import check_output_file

    check_output_file(path, flag, suffixes=suffixes)


def write_output(write, path: str | Path, flag: str) -> None:
    """``write(path)`` (``~`` expanded, its folder created), or one line when the disk filled up
    during the run (the results were printed above)."""
    from dali_ba.errors import UserError

    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(path))
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write it ({exc.strerror or exc}); the results are printed above") \
            from None
