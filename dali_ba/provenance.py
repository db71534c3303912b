"""Where results came from: the git commit of the dali-ba checkout the code runs from.

Benchmark and science records, pack manifests and the trainer's ``start`` event carry it, so a
result stays traceable to the code that made it (``git_dirty``: the checkout had uncommitted
changes to tracked files). Outside a git checkout (an installed wheel) both are None.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

CHECKOUT = Path(__file__).resolve().parents[1]


def git_commit(repo: Optional[Path] = None) -> dict:
    """``{"git_commit": sha, "git_dirty": bool}`` of ``repo`` (default: this code's checkout)."""
    repo = Path(repo or CHECKOUT)
    if not (repo / ".git").exists() or not (repo / "dali_ba").is_dir():
        return {"git_commit": None, "git_dirty": None}
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": sha, "git_dirty": dirty}
