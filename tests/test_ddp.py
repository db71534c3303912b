"""Two real DDP processes (torchrun, gloo, CPU) running the real trainer on JPEGs decoded by DALI.

The worker is the trainer's own entry point with two spies around it: one records the index of
every image each rank receives (the images are flat grey levels that encode their index), one
saves each rank's weights whenever the trainer checkpoints. Optionally a rank sends itself
SIGTERM at a given step (a real signal at a deterministic point, instead of a timed sleep).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_image_folder, write_indexed_folder

from trainers import checkpoint as ckpt
from trainers.loop import PREEMPTED
from trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
IMAGES, B, M, EPOCHS = 48, 4, 2, 3  # 48 // (4 · 2 ranks) = 6 steps per epoch, 18 steps

WORKER = textwrap.dedent('''
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import index_of
    import dali_ba.loader as L
    import trainers.checkpoint as C
    from trainers.train import main

    rank, spy = int(os.environ["RANK"]), os.environ["SPY_DIR"]
    signal_at = int(os.environ.get("SPY_SIGNAL_AT", "0"))
    seen = open(os.path.join(spy, f"seen{{rank}}.jsonl"), "a")
    batches = [0]
    original_iter, original_save = L.BatchAugmentLoader.__iter__, C.save_checkpoint

    def spy_iter(self):
        gen = original_iter(self)
        try:
            for images, labels in gen:
                idx = [index_of(img) for img in images]
                seen.write(json.dumps({{"epoch": self.epoch, "idx": idx, "labels": labels.tolist()}}) + "\\n")
                seen.flush()
                batches[0] += 1
                if batches[0] == signal_at and rank == 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives while this batch is fetched
                yield images, labels
        finally:
            gen.close()

    def spy_save(paths, env, **kw):
        torch.save(kw["engine"].model.state_dict(), os.path.join(spy, f"rank{{rank}}_step{{kw['step']}}.pt"))
        return original_save(paths, env, **kw)

    L.BatchAugmentLoader.__iter__, C.save_checkpoint = spy_iter, spy_save
    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    write_indexed_folder(root / "train", IMAGES, classes=4)
    write_image_folder(root / "val", classes=3, per_class=3, size_range=(16, 24))  # 9 images: shards of 4 and 5
    return root


def launch(data: Path, tmp: Path, name: str, signal_at: int = 0, timeout: int = 300) -> tuple:
    out, spy = tmp / name, tmp / f"{name}-spy"
    spy.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"train_root": str(data / "train"), "val_root": str(data / "val"), "batch_size": B, "num_views": M,
                 "image_size": 16, "augment": "cifar", "pad": 0, "mean": [0, 0, 0], "std": [1, 1, 1],
                 "num_threads": 1, "device": "cpu"},
        "model": {"arch": "smallnet"},
        "optim": {"lr": 0.1, "reference_batch": B},
        "eval": {"batch_size": 4},
        "train": {"epochs": EPOCHS, "out_dir": str(out), "checkpoint_every": 4, "eval_every": 6, "seed": 3,
                  "log_every": 1},
        "diagnostics": {"every": 5},
    }
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    worker = tmp / "ddp_worker.py"
    worker.write_text(WORKER.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPY_DIR": str(spy), "SPY_SIGNAL_AT": str(signal_at),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), "--config", str(tmp / f"{name}.yaml")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return done, out, spy


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """One uninterrupted two-rank run of 18 steps (3 epochs)."""
    done, out, spy = launch(data, tmp_path_factory.mktemp("ddp"), "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out, spy


def seen_by_rank(spy: Path) -> dict:
    return {r: [json.loads(line) for line in (spy / f"seen{r}.jsonl").read_text().splitlines()] for r in (0, 1)}


def test_two_ranks_disjoint_shards_identical_weights_outputs(straight):
    done, out, spy = straight
    seen = seen_by_rank(spy)
    assert len(seen[0]) == len(seen[1]) == 6 * EPOCHS
    for epoch in range(EPOCHS):
        per_rank = {}
        for r in (0, 1):
            batches = [b for b in seen[r] if b["epoch"] == epoch]
            idx = [i for b in batches for i in b["idx"]]
            assert all(idx[k] == idx[k + 1] for k in range(0, len(idx), M))  # M views of one image, adjacent
            per_rank[r] = set(idx)
            assert len(per_rank[r]) == len(batches) * B  # every image once per epoch on its rank
            for b in batches:  # labels follow the image (class = index % 4 in write_indexed_folder)
                assert b["labels"] == [i % 4 for i in b["idx"]]
        assert not per_rank[0] & per_rank[1], f"epoch {epoch}: ranks overlap"
        assert per_rank[0] | per_rank[1] == set(range(IMAGES))
    orders = [[i for b in seen[0] if b["epoch"] == e for i in b["idx"]] for e in range(EPOCHS)]
    assert orders[0] != orders[1]  # reshuffled every epoch

    steps = sorted(int(p.stem.split("step")[1]) for p in spy.glob("rank0_step*.pt"))
    assert steps == [4, 6, 8, 12, 16, 18]  # checkpoint_every=4, best after evals at 6 and 12, the end
    for step in steps:  # DDP keeps the parameters identical on both ranks (buffers: rank 0's are saved)
        w0, w1 = (torch.load(spy / f"rank{r}_step{step}.pt") for r in (0, 1))
        for name, param in parameters(w0).items():
            assert torch.equal(param, w1[name]), (step, name)
    state = ckpt.load(out / "checkpoints" / ckpt.LAST)
    assert state["step"] == 18 and state["world_size"] == 2
    assert [s["shard_id"] for s in state["loader"]] == [0, 1]
    final = torch.load(spy / "rank0_step18.pt")
    assert all(torch.equal(v, final[k]) for k, v in state["model"].items())

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 19))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12, 18] and all(r["val_images"] == 9 for r in evals)
    diag = [r for r in rows if r["kind"] == "diag"]
    assert [r["step"] for r in diag] == [5, 10, 15]
    assert all(r["noise_pair"] == "ddp" and r["probe"] == "view" and r["grad_norm2_local"] > 0 for r in diag)
    assert "done: step 18/18" in done.stdout


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_and_resume_matches_the_straight_run(data, straight, tmp_path):
    done, out, spy = launch(data, tmp_path, "preempted", signal_at=8)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / PREEMPTED).is_file()
    state = ckpt.load(out / "checkpoints" / ckpt.LAST)
    # Rank 1 got SIGTERM while fetching the 8th batch: the ranks agree on it before training that
    # step, so both checkpoint after step 7 with their loaders at the 8th batch (not trained, not lost).
    assert state["step"] == 7
    assert [(s["epoch"], s["step"]) for s in state["loader"]] == [(1, 1), (1, 1)]  # mid-epoch (6 steps per epoch)
    assert read_metrics(out / "metrics.jsonl", "event")[-1]["event"] == "preempted"

    again, out, _ = launch(data, tmp_path, "preempted")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (out / PREEMPTED).exists()
    resumed = ckpt.load(out / "checkpoints" / ckpt.LAST)
    reference = ckpt.load(straight[1] / "checkpoints" / ckpt.LAST)
    assert resumed["step"] == reference["step"] == 18
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def parameters(state_dict: dict) -> dict:
    """The learned tensors of a state dict (BatchNorm running statistics are per rank by design)."""
    return {k: v for k, v in state_dict.items() if "running_" not in k and "num_batches_tracked" not in k}
