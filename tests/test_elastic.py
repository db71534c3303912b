"""Elastic resume: a run that fixes its global batch continues on another number of ranks with the
same images per global step and the same learning rate, through real torchrun with gloo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import write_indexed_folder

from trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
IMAGES, GLOBAL = 48, 8  # 6 global steps per epoch

WORKER = textwrap.dedent('''
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import index_of
    import dali_ba.loader as L
    from trainers.train import main

    rank, spy = int(os.environ["RANK"]), os.environ["SPY_DIR"]
    stop_at = int(os.environ.get("SPY_STOP_AT", "0"))
    seen = open(os.path.join(spy, f"seen{{rank}}.jsonl"), "a")
    original = L.BatchAugmentLoader.__iter__

    def spy_iter(self):
        for images, labels in original(self):
            position = (self.epoch, self.step - 1) if self.step else (self.epoch - 1, len(self) - 1)
            named = [int(os.path.basename(self.dataset.files[i])[:3]) for i in self.batch_indices(*position)]
            seen.write(json.dumps({{"position": position, "idx": sorted({{index_of(x) for x in images}}),
                                   "api": sorted(named)}}) + "\\n")
            seen.flush()
            if stop_at and rank == 0 and position == (0, stop_at):
                os.kill(os.getpid(), signal.SIGTERM)  # pre-empted while fetching this batch
            yield images, labels

    L.BatchAugmentLoader.__iter__ = spy_iter
    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_indexed_folder(tmp_path_factory.mktemp("elastic") / "train", IMAGES, classes=4)


def launch(data: Path, out: Path, ranks: int, spy: Path, stop_at: int = 0, **train) -> subprocess.CompletedProcess:
    config = {"data": {"train_root": str(data), "global_batch_size": GLOBAL, "num_views": 2, "image_size": 16,
                       "augment": "cifar", "pad": 0, "mean": [0, 0, 0], "std": [1, 1, 1], "num_threads": 1,
                       "device": "cpu"},
              "model": {"arch": "smallnet"}, "optim": {"lr": 0.1, "reference_batch": GLOBAL},
              "schedule": {"kind": "cosine", "warmup_epochs": 0.5},
              "train": {"epochs": 2, "out_dir": str(out), "seed": 5, "log_every": 1, **train}}
    path = out.parent / f"{out.name}-{ranks}.yaml"
    path.write_text(yaml.safe_dump(config))
    worker = out.parent / "elastic_worker.py"
    worker.write_text(WORKER.format(tests=str(REPO / "tests")))
    spy.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPY_DIR": str(spy), "SPY_STOP_AT": str(stop_at),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           str(worker), "--config", str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def images_per_step(spy: Path) -> dict:
    """Global step → the set of image indices all ranks read for it (and what the API says)."""
    steps: dict = {}
    for path in spy.glob("seen*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert row["idx"] == row["api"]  # batch_indices names the images the rank really read
            key = tuple(row["position"])
            steps.setdefault(key, set()).update(row["api"])
    return steps


@pytest.mark.slow
def test_a_two_rank_run_resumes_on_one_and_on_four_ranks_with_the_same_global_steps(data, tmp_path):
    straight_spy = tmp_path / "straight-spy"
    done = launch(data, tmp_path / "straight", 2, straight_spy)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = images_per_step(straight_spy)
    assert len(straight) == 12 and all(len(v) == GLOBAL for v in straight.values())
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", "train")}

    stopped = tmp_path / "stopped"
    done = launch(data, stopped, 2, tmp_path / "stopped-spy", stop_at=4)
    assert done.returncode == 0, done.stderr[-3000:]
    for ranks in (1, 4):
        out = tmp_path / f"resumed-{ranks}"
        shutil.copytree(stopped, out)
        spy = tmp_path / f"resumed-{ranks}-spy"
        done = launch(data, out, ranks, spy)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "fresh augmentation draws" in done.stderr and f"resumed on {ranks} ranks" in done.stderr
        resumed = images_per_step(spy)
        assert min(resumed) == (0, 4) and len(resumed) == 12 - 4
        for position, images in resumed.items():  # the same images in every later global step
            assert images == straight[position], (ranks, position)
        rows = read_metrics(out / "metrics.jsonl")
        after = {r["step"]: r["lr"] for r in rows if r["kind"] == "train" and r["step"] > 4}
        assert sorted(after) == list(range(5, 13)) and all(after[s] == pytest.approx(lr[s]) for s in after)
        events = [r for r in rows if r["kind"] == "event" and r["event"] == "data_changed"]
        assert len(events) == 1 and f"on {ranks} ranks" in events[0]["message"]


def test_a_global_batch_that_does_not_divide_is_one_line_and_exit_2(data, tmp_path):
    done = launch(data, tmp_path / "three", 3, tmp_path / "three-spy")  # plain torchrun: printed by rank 0 only
    lines = [line for line in done.stderr.splitlines() if "trainers.train: error" in line]
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert "data.global_batch_size=8 does not divide among 3 ranks" in lines[0]
    config = tmp_path / "three-3.yaml"
    launcher = subprocess.run([sys.executable, "-m", "dali_ba.cli", "train", "--config", str(config), "--nproc", "3"],
                              cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert launcher.returncode == 2 and launcher.stderr.count("\n") == 1, launcher.stderr
    assert "does not divide among 3 ranks" in launcher.stderr
