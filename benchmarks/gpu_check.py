"""``make gpu-check``: one command that proves the GPU path on one GPU, within a wall-time budget.

``PYTHONPATH=. python3 -m benchmarks.gpu_check`` from a source tree (nothing installed), steps in
order (``gpu_steps``), each with its own budget and timeout inside the total (8 minutes by
default); a step that no longer fits in what is left is skipped, with the reason recorded:

  data      ImageNet-like JPEGs (``dali-ba data synth``)
  tests     the ``gpu``-marked tests (``tests/test_gpu.py``)
  probe     pipeline build time and memory over epochs and an evaluation, decoder hints off and on
  loader    ``bench loader``: M=1 and 4, fused / naive full decode / naive crop decode / DALI's RN50
            graph, then a ``hw_decoder_load`` sweep
  train     ``bench train``: ResNet-50, bf16, channels-last, real vs synthetic, M=1 and 4
  torchrun  the trainer under torchrun (NCCL, one process), SIGTERM mid-run, resumed to the end

Writes ``benchmarks/results/gpu-<card>-<date>.json`` (card, driver, versions, git commit, each
step's status, duration and results) and prints a summary. Exit 0 when every step passed, 1 when
one failed or was skipped, 2 with one line when there is no GPU or a dependency is missing.
``--dry-run`` runs the same machinery with stand-in steps and no GPU (what the CPU tests check).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480.0
# (module, what to name when it is missing); each must import on the GPU machine.
REQUIRED = (("torch", "torch"), ("nvidia.dali", "DALI (nvidia-dali-cuda120/130)"), ("omegaconf", "omegaconf"),
            ("yaml", "pyyaml"), ("numpy", "numpy"), ("PIL", "pillow"), ("tqdm", "tqdm"), ("pytest", "pytest"),
            ("torchvision", "torchvision"))
CARRY_HINT = ("on a machine without a package registry carry them with ../shared/device/dali-bundle.sh "
              "(DALI and omegaconf are in its bundle; MORE_PKGS='name==version' adds others), "
              "elsewhere pip install them")


class StepFailed(Exception):
    """A step's check failed: ``message`` (one line) and what it measured before failing."""

    def __init__(self, message: str, result: Optional[dict] = None):
        super().__init__(message)
        self.message, self.result = message, result or {}


@dataclass
class Step:
    name: str
    budget_s: float  # the step's timeout, at most
    run: Callable[["Context"], dict]  # returns results (with a one-line "summary"); raises StepFailed
    min_s: float = 0.0  # skipped when less is left of the total (0: half the budget)


@dataclass
class Context:
    """What a step gets: where the repository, its scratch folder and the data are, its deadline."""

    repo: Path
    work: Path
    data: Path
    python: str
    deadline: float  # time.monotonic() by which the step must be done
    options: Dict[str, object] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def env(self, **extra: str) -> Dict[str, str]:
        """This environment with the source tree first on PYTHONPATH (no install needed)."""
        path = os.pathsep.join(p for p in (str(self.repo), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}

    def run(self, argv: Sequence[str], name: str, timeout: Optional[float] = None,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in the repository root, output to ``work/<name>.log``; StepFailed on a
        non-zero exit (naming the log's last line) or past the deadline (the process group killed)."""
        proc = self.start(argv, name, env)
        limit = max(1.0, min(self.left(), timeout if timeout is not None else self.left()))
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise StepFailed(f"{name}: timed out after {limit:.0f} s (log: {self.work / (name + '.log')})") from None
        text = (self.work / f"{name}.log").read_text(errors="replace")
        if proc.returncode != 0:
            tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
            raise StepFailed(f"{name}: exit {proc.returncode}: {tail[0][:300]} (log: {self.work / (name + '.log')})")
        return subprocess.CompletedProcess(list(argv), proc.returncode, text, "")

    def start(self, argv: Sequence[str], name: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """Start ``argv`` in its own process group, stdout and stderr to ``work/<name>.log``."""
        self.log(f"gpu-check: {name}: {' '.join(argv)}")
        log = open(self.work / f"{name}.log", "w")
        try:
            return subprocess.Popen(list(argv), cwd=self.repo, env=env or self.env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with its own session), SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_steps(steps: Sequence[Step], total_s: float, context: Callable[[float], Context],
              clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = print) -> List[dict]:
    """Each step in order with ``timeout = min(its budget, what is left of total_s)``; one that
    needs more than is left is skipped. ``context(deadline)`` makes the step's Context."""
    start, records = clock(), []
    for step in steps:
        left = total_s - (clock() - start)
        need = step.min_s or step.budget_s / 2
        record = {"name": step.name, "budget_s": step.budget_s}
        if left < need:
            reason = f"{max(left, 0):.0f} s left of the {total_s:.0f} s budget; the step needs {need:.0f} s"
            record.update(status="skipped", duration_s=0.0, result={}, reason=reason)
            log(f"gpu-check: {step.name}: skipped ({record['reason']})")
            records.append(record)
            continue
        t0 = clock()
        try:
            result, status, reason = step.run(context(t0 + min(step.budget_s, left))), "passed", None
        except StepFailed as exc:
            result, status, reason = exc.result, "failed", exc.message
        except Exception as exc:  # noqa: BLE001 - a bug in one step must not lose the others' results
            result, status, reason = {}, "failed", f"{type(exc).__name__}: {exc}"
        record.update(status=status, duration_s=round(clock() - t0, 1), result=result, reason=reason)
        log(f"gpu-check: {step.name}: {status} in {record['duration_s']:.0f} s"
            + (f": {reason}" if reason else f": {result.get('summary', '')}"))
        records.append(record)
    return records


def _nvidia_gpu_present() -> bool:
    return any(Path("/proc/driver/nvidia/gpus").glob("*")) if Path("/proc/driver/nvidia/gpus").is_dir() else False


def preflight() -> Optional[str]:
    """The one line to stop with (no GPU, a missing dependency), or None to go on."""
    if find_spec("torch") is None:
        if not _nvidia_gpu_present():
            return "gpu-check: no CUDA GPU is visible (and torch is not installed): nothing to check on this machine"
        return f"gpu-check: torch is missing: {CARRY_HINT}"
    import torch

    if not torch.cuda.is_available():
        return (f"gpu-check: no CUDA GPU is visible (torch {torch.__version__}: torch.cuda.is_available() is False): "
                "it needs a machine with one")
    missing = []
    for module, label in REQUIRED:
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is missing too
            found = False
        if not found:
            missing.append(label)
    if missing:
        return f"gpu-check: missing {', '.join(missing)}: {CARRY_HINT}"
    return None


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (for the record's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def result_path(out_dir: Path, card: str, when: Optional[time.struct_time] = None) -> Path:
    """``out_dir/gpu-<card>-<YYYYMMDD>.json``, with the time added when that file already exists."""
    when = when or time.localtime()
    path = out_dir / f"gpu-{card_slug(card)}-{time.strftime('%Y%m%d', when)}.json"
    return path if not path.exists() else out_dir / f"gpu-{card_slug(card)}-{time.strftime('%Y%m%d-%H%M%S', when)}.json"


def write_result(path: Path, info: dict, steps: List[dict], settings: dict, started: float) -> dict:
    """The record (commit, machine, versions, the GPU and DALI stack, the steps), written as JSON."""
    from benchmarks.record import new_record, write_record

    record = new_record("gpu-check")
    record.update(card=info.get("device_name"), stack=info, settings=settings, steps=steps,
                  wall_s=round(time.monotonic() - started, 1), ok=all(s["status"] == "passed" for s in steps))
    write_record(path, record)
    return record


def summary(record: dict, path: Path) -> str:
    stack = record.get("stack") or {}
    lines = [f"gpu-check on {record.get('card') or 'no GPU'}: driver {stack.get('driver')}, torch {stack.get('torch')} "
             f"(CUDA {stack.get('torch_cuda')}), DALI {stack.get('dali')} (CUDA {stack.get('dali_cuda')}), "
             f"nvImageCodec {stack.get('nvimgcodec')}; {record['wall_s']:.0f} s"]
    for s in record["steps"]:
        detail = s["reason"] if s["status"] != "passed" else s["result"].get("summary", "")
        lines.append(f"  {s['name']:<9} {s['status']:<8} {s['duration_s']:6.0f} s  {detail}")
    lines.append(f"{'all steps passed' if record['ok'] else 'NOT all steps passed'}; wrote {path}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.gpu_steps import STEP_NAMES

    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total wall time, data included (480)")
    p.add_argument("--steps", default=",".join(STEP_NAMES), help=f"comma-separated, from {','.join(STEP_NAMES)}")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where the JSON record goes")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "gpu-check"), help="data, logs, trainer runs")
    p.add_argument("--images", type=int, default=3000, help="synthetic training JPEGs (val: a tenth)")
    p.add_argument("--kill-signal", choices=("TERM", "KILL"), default="TERM",
                   help="torchrun step: TERM (pre-emption: checkpoint now) or KILL (crash: the last periodic one)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: stand-in steps, the real record and summary")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from benchmarks.gpu_steps import STEP_NAMES

    parser = build_parser()
    args = parser.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in args.steps if s not in STEP_NAMES]
    if unknown or not args.steps:
        parser.error(f"--steps: unknown {','.join(unknown) or '(none)'}; expected some of {','.join(STEP_NAMES)}")
    if args.budget_s <= 0 or args.images < 100:
        parser.error("--budget-s must be > 0 and --images >= 100")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from benchmarks import gpu_steps

    args = parse_args(argv)
    if not args.dry_run:
        stop = preflight()
        if stop is not None:
            print(stop, file=sys.stderr, flush=True)
            return 2
    started = time.monotonic()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    options = {"images": args.images, "kill_signal": args.kill_signal}

    def context(deadline: float) -> Context:
        return Context(REPO, work, work / "data", sys.executable, deadline, options, log)

    if args.dry_run:
        info, steps = gpu_steps.dry_info(), gpu_steps.dry_steps(args.steps)
    else:
        info, steps = gpu_steps.stack_info(context(time.monotonic() + 60)), gpu_steps.steps(args.steps)
    records = run_steps(steps, args.budget_s - (time.monotonic() - started), context, log=log)
    gpu_steps.collect_warnings(records, work)
    path = result_path(Path(args.out_dir), info.get("device_name") or "gpu")
    settings = {"budget_s": args.budget_s, "steps": args.steps, "images": args.images,
                "kill_signal": args.kill_signal, "dry_run": args.dry_run}
    record = write_result(path, info, records, settings, started)
    print(summary(record, path), flush=True)
    return 0 if record["ok"] else 1


if __name__ == "__main__":  # run as benchmarks.gpu_check, the module gpu_steps imports (one StepFailed)
    from benchmarks.gpu_check import main as _main

    sys.exit(_main())
