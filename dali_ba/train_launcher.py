"""``dali-ba train``: run the trainer (``python -m trainers.train``) in a child process.

``--nproc N`` (N > 1) starts ``torchrun --standalone --nproc_per_node=N`` instead (one machine;
for several nodes call torchrun yourself with the same arguments). Free ``key=value`` arguments
are config overrides, applied in order (the last word wins). The config is first checked by
``python -m trainers.train --check`` (no torch import, well under a second), so a mistake is one
line and exit 2 once, not once per rank under torchrun. This module never imports ``trainers``:
the trainer is a consumer of dali_ba, not part of it. SIGTERM/SIGUSR1 are forwarded to the child, so
pre-emption reaches the training processes (SIGINT and SIGHUP are not: a terminal's Ctrl-C or
hang-up already reaches the child, which is in the same process group); the exit code is the
child's. Under torchrun, a user error or a Ctrl-C that the ranks handled (exit 2 or 130) ends with
the ranks' one line, without torchrun's own failure report (``torchrun_output``); the exit code is
then the ranks'.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import List


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dali_ba.dataset import expand_path

    parser.add_argument("--config", required=True, type=expand_path,
                        help="run recipe (YAML), e.g. pipelines/demo-cpu.yaml")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="processes on this machine (N > 1: torchrun --standalone; default 1)")
    parser.add_argument("--resume", default=None, metavar="PATH", type=expand_path,
                        help="auto | none | a run directory | a checkpoint file (same as train.resume=PATH)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=1")


def build_command(config: str, overrides: List[str], nproc: int = 1, resume: str | None = None,
                  check: bool = False) -> List[str]:
    args = ["-m", "trainers.train", "--config", config, *(["--check"] if check else []), *overrides]
    if resume:
        args += ["--resume", resume]
    if nproc > 1 and not check:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def run(args: argparse.Namespace) -> int:
    from dali_ba.errors import ConfigError

    limit = os.cpu_count() or 1
    if not 1 <= args.nproc <= max(limit, 8):
        raise ConfigError(f"--nproc: expected 1..{max(limit, 8)} (processes on this machine); got {args.nproc}")
    overrides = list(getattr(args, "overrides", []) or [])
    env = {**os.environ, "WORLD_SIZE": str(args.nproc)}  # the check sees the world the run will have
    checked = subprocess.run(build_command(args.config, overrides, resume=args.resume, check=True), env=env)
    if checked.returncode != 0:  # the check printed its one line
        return checked.returncode
    torchrun = args.nproc > 1
    # torchrun sets OMP_NUM_THREADS=1 when it is unset, with a banner saying so: set it ourselves.
    run_env = {"OMP_NUM_THREADS": "1", **os.environ} if torchrun else None
    child = subprocess.Popen(build_command(args.config, overrides, args.nproc, args.resume), env=run_env,
                             stderr=subprocess.PIPE if torchrun else None)
    interrupted = []
    previous = {
        s: signal.signal(s, lambda signum, frame: child.send_signal(signum)) for s in (signal.SIGTERM, signal.SIGUSR1)
    }
    # A terminal's Ctrl-C or hang-up already reaches the child (same process group): noted here, not
    # forwarded, and this process waits for the child to save (a hang-up under nohup stays ignored).
    for s in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, lambda signum, frame: interrupted.append(signum))
    try:
        if not torchrun:
            return child.wait()
        from dali_ba.torchrun_output import ReportFilter

        report = ReportFilter(child.stderr, sys.stderr.buffer)
        code = child.wait()
        return report.finish(code, interrupted=interrupted[0] if interrupted else 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
