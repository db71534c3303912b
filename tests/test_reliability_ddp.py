"""Reliability with two real DDP processes (gloo, CPU): bad data, pre-emption, a rank that dies.

Each test starts real trainer processes, under torchrun or as bare processes with the
RANK/WORLD_SIZE/MASTER_* variables set (as a SLURM `srun` per rank would), sends real signals and
times how long the others take to stop. test_ddp.py already proves disjoint shards, identical
weights, and SIGTERM on one rank followed by a bit-exact resume; not repeated here.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_image_folder, write_indexed_folder

from benchmarks.processes import children
from dali_ba import BatchAugmentLoader
from trainers import checkpoint as ckpt
from trainers.loop import PREEMPTED
from trainers.metrics import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
IMAGES, B, SEED = 48, 4, 3  # 48 // (4 · 2 ranks) = 6 steps per epoch
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel_ddp_data")
    write_indexed_folder(root / "train", IMAGES, classes=4)
    write_image_folder(root / "val", classes=4, per_class=2, size_range=(16, 24))
    return root


def config(data: Path, tmp: Path, name: str, **train) -> Path:
    values = {
        "data": {"train_root": str(data / "train"), "val_root": str(data / "val"), "batch_size": B, "num_views": 2,
                 "image_size": 16, "augment": "cifar", "pad": 0, "num_threads": 1, "device": "cpu"},
        "model": {"arch": "smallnet"},
        "optim": {"lr": 0.1, "reference_batch": B},
        "eval": {"batch_size": 4},
        "train": {"epochs": 3, "out_dir": str(tmp / name), "eval_every": 6, "seed": SEED, "log_every": 1, **train},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def torchrun(cfg: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainers.train",
           "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def bare_ranks(cfg: Path) -> list:
    """Two trainer processes joined through env:// with no launcher supervising them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainers.train", "--config", str(cfg)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_steps(out: Path, steps: int, procs: list, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        path = out / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
            if max([r["step"] for r in rows if r["kind"] == "train"], default=0) >= steps:
                return
        for p in procs:
            assert p.poll() is None, f"exited early with {p.returncode}: {p.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.05)


def finish(procs: list, timeout: float) -> tuple:
    """Wait for every process; (seconds until the last one exited, [(rc, stdout, stderr)])."""
    start = time.monotonic()
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"still running {timeout:.0f} s later: hung") from None
        results.append((p.returncode, out, err))
    return time.monotonic() - start, results


def our_error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if "trainers.train: error:" in line]


# ----------------------------------------------------------------------------- bad data
def test_a_file_that_fails_on_one_rank_stops_both_after_a_checkpoint_and_resume_is_exact(data, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(data / "train", train)
    probe = BatchAugmentLoader(train, batch_size=B, shard_id=1, num_shards=2, seed=SEED, device="cpu")
    victim = Path(probe.dataset.files[probe.batch_indices(0, 3)[0]])  # rank 1, step 3 of epoch 0
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])
    failing = config(data, tmp_path, "failing", dist_timeout_s=300)
    values = yaml.safe_load(failing.read_text())
    values["data"]["train_root"] = str(train)
    failing.write_text(yaml.safe_dump(values))
    reference = config(data, tmp_path, "reference")

    runs = [torchrun(failing), torchrun(reference)]  # side by side
    took, ((rc, _, err),) = finish(runs[:1], 400)
    _, ((ref_rc, _, ref_err),) = finish(runs[1:], 400)
    assert ref_rc == 0, ref_err[-3000:]
    assert rc != 0
    print(f"\ndecode error on rank 1 at step 3: both ranks saved and stopped; the whole run took {took:.1f} s")
    assert took < 200  # start-up included, far below the 300 s collective timeout: nobody waited for it
    lines = our_error_lines(err)
    assert len(lines) == 1, err[-3000:]  # printed once (by rank 0), for both ranks
    assert f"rank 1: cannot decode {victim}" in lines[0] and "training stopped after step 3" in lines[0]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err
    state = ckpt.load(tmp_path / "failing" / "checkpoints" / ckpt.LAST)
    assert state["step"] == 3 and [(s["epoch"], s["step"]) for s in state["loader"]] == [(0, 3), (0, 3)]

    victim.write_bytes(original)
    resumed = torchrun(failing)
    _, ((rc, _, err),) = finish([resumed], 300)
    assert rc == 0, err[-3000:]
    final = ckpt.load(tmp_path / "failing" / "checkpoints" / ckpt.LAST)
    expected = ckpt.load(tmp_path / "reference" / "checkpoints" / ckpt.LAST)
    assert final["step"] == expected["step"] == 18
    assert all(torch.equal(v, final["model"][k]) for k, v in expected["model"].items())


# ----------------------------------------------------------------------------- pre-emption
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_every_process_saves_once_and_every_rank_exits_cleanly(data, tmp_path, signum):
    """Like SLURM: the signal reaches every rank at once (SIGTERM also reaches torchrun itself;
    SIGUSR1 would kill torchrun, so docker/slurm/train.sbatch turns it into SIGTERM for the step)."""
    cfg = config(data, tmp_path, "run", epochs=1000)
    agent = torchrun(cfg)
    wait_steps(tmp_path / "run", 3, [agent])
    workers = children(agent.pid)
    assert len(workers) == 2
    targets = workers + ([agent.pid] if signum == signal.SIGTERM else [])
    for pid in targets:
        os.kill(pid, signum)
    elapsed, ((rc, out, err),) = finish([agent], 120)
    print(f"\n{signal.Signals(signum).name} to all: stopped {elapsed:.1f} s after the signal")
    assert rc == 0 if signum == signal.SIGUSR1 else rc != 0  # torchrun exits 1 when it is SIGTERMed itself
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err and not our_error_lines(err)
    run_dir = tmp_path / "run"
    assert (run_dir / PREEMPTED).is_file()
    state = ckpt.load(run_dir / "checkpoints" / ckpt.LAST)
    events = read_metrics(run_dir / "metrics.jsonl", "event")
    assert events[-1]["event"] == "preempted" and events[-1]["step"] == state["step"]
    assert [s["shard_id"] for s in state["loader"]] == [0, 1]
    assert len({s["step"] for s in state["loader"]}) == 1  # both ranks stopped after the same step
    assert f"pre-empted ({signal.Signals(signum).name})" in out


# ----------------------------------------------------------------------------- a rank dies or hangs
def test_a_killed_worker_under_torchrun_takes_the_other_down_quickly(data, tmp_path):
    cfg = config(data, tmp_path, "run", epochs=1000, dist_timeout_s=60)
    agent = torchrun(cfg)
    wait_steps(tmp_path / "run", 3, [agent])
    workers = children(agent.pid)
    os.kill(workers[1], signal.SIGKILL)
    elapsed, ((rc, _, err),) = finish([agent], 90)
    print(f"\nSIGKILL of rank 1 under torchrun: everything stopped {elapsed:.1f} s later")
    assert rc != 0 and elapsed < 45
    assert "[rank0]: Traceback" not in err
    lines = our_error_lines(err)
    assert len(lines) <= 1 and all("[rank 0]" in line and "lost contact with another rank" in line for line in lines)
    if (tmp_path / "run" / "checkpoints" / ckpt.LAST).exists():
        ckpt.load(tmp_path / "run" / "checkpoints" / ckpt.LAST)  # whatever was saved is whole


def test_bare_processes_the_store_host_dies_and_the_other_rank_exits_with_one_line(data, tmp_path):
    cfg = config(data, tmp_path, "run", epochs=1000, dist_timeout_s=60)
    procs = bare_ranks(cfg)
    try:
        wait_steps(tmp_path / "run", 3, procs)
        procs[0].kill()  # rank 0 also hosts the TCP store
        elapsed, results = finish(procs[1:], 90)
    finally:
        for p in procs:
            p.kill()
    rc, _, err = results[0]
    print(f"\nSIGKILL of rank 0 (bare processes): rank 1 exited {elapsed:.1f} s later with {rc}")
    assert rc == 1 and elapsed < 45
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("train")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("[rank 1] trainers.train: error: lost contact with another rank")


def test_bare_processes_a_hung_rank_is_given_up_after_the_collective_timeout(data, tmp_path):
    timeout_s = 8
    cfg = config(data, tmp_path, "run", epochs=1000, dist_timeout_s=timeout_s)
    procs = bare_ranks(cfg)
    try:
        wait_steps(tmp_path / "run", 3, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive, sockets open, silent: only a timeout can tell
        elapsed, results = finish(procs[:1], timeout_s + 60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    rc, _, err = results[0]
    print(f"\nSIGSTOP of rank 1: rank 0 gave up {elapsed:.1f} s later (train.dist_timeout_s={timeout_s})")
    assert rc == 1 and timeout_s - 1 <= elapsed <= timeout_s + 45
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("train")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "lost contact with another rank" in lines[0]
