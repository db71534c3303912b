"""Two real DDP ranks (gloo, CPU) meeting the faults of a careless or hostile user.

`dali-ba train --nproc 2` (torchrun underneath) for Ctrl-C and a loss that becomes NaN: every rank
stops after the same step, one checkpoint, one line, the ranks' exit status, and none of torchrun's
failure report. Bare ranks (RANK/WORLD_SIZE set, no launcher) for a set-up step that fails on rank 0
alone: rank 1 must learn of it and stop too, not wait in its next collective.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import last_checkpoint, tiny, write_yaml

from trainers.metrics import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "dali_ba.cli"]


def env_in(tmp_path: Path) -> dict:
    """The environment, with temporary files (torchrun's log folders) kept under ``tmp_path``."""
    return {**ENV, "TMPDIR": str(tmp_path)}


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip() and not line.lstrip("\r").startswith("train:")]


def test_ctrl_c_under_nproc_2_saves_once_and_exits_130(data, tmp_path):
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, train={"epochs": 1000, "max_steps": 400}, data={"batch_size": 4}),
                        tmp_path / "run.yaml")
    proc = subprocess.Popen([*CLI, "train", "--config", str(config), "--nproc", "2"], cwd=REPO, env=env_in(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(out / "metrics.jsonl", "train") if (out / "metrics.jsonl").exists() else []) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher, torchrun and both ranks
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    state = last_checkpoint(out)
    saved = [line for line in error_lines(stderr) if "checkpoint saved" in line]
    assert saved == [f"trainers.train: interrupted (SIGINT) at step {state['step']}: checkpoint saved in "
                     f"{out / 'checkpoints'}; run the same command again to resume"]
    assert state["world_size"] == 2 and read_metrics(out / "metrics.jsonl", "event")[-1]["event"] == "interrupted"


def test_a_nan_loss_under_nproc_2_stops_both_ranks_with_one_line(data, tmp_path):
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, optim={"lr": 1e5, "reference_batch": 8}, train={"amp": "fp16"}),
                        tmp_path / "run.yaml")
    done = subprocess.run([*CLI, "train", "--config", str(config), "--nproc", "2"], cwd=REPO, env=env_in(tmp_path),
                          capture_output=True, text=True, timeout=300)
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "not finite at step" in lines[0] and "saved" in lines[0]
    state = last_checkpoint(out)
    assert state["world_size"] == 2 and f"stopped after step {state['step']}" in lines[0]
    assert read_metrics(out / "metrics.jsonl", "event")[-1]["reason"] == "nonfinite_loss"


def test_a_set_up_failure_on_rank_0_alone_stops_rank_1_too(data, tmp_path):
    """Rank 0 alone prepares out_dir; here its config.yaml cannot be written (a folder of that name).
    Both ranks must exit 2 within seconds (not after train.dist_timeout_s), rank 0 with the line."""
    out = tmp_path / "run"
    (out / "config.yaml").mkdir(parents=True)
    config = write_yaml(tiny(data, out, train={"dist_timeout_s": 120}), tmp_path / "run.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "trainers.train", "--config", str(config)], cwd=REPO,
                              env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    started = time.monotonic()
    results = [p.communicate(timeout=100) for p in procs]
    elapsed = time.monotonic() - started
    assert [p.returncode for p in procs] == [2, 2], [r[1][-2000:] for r in results]
    rank0, rank1 = (error_lines(err) for _, err in results)
    assert len(rank0) == 1 and f"cannot write {out / 'config.yaml'}" in rank0[0] and rank1 == []
    assert elapsed < 60
