"""Reliability under load and over time: memory across epochs, thread counts, and randomness that
must differ (ranks, epochs) or must not (thread count, a rerun with the same seed).

test_loader.py already shows a new shuffle in the second epoch, disjoint rank shards, different
views within a batch and same-seed reproducibility of the first batch; this file goes further:
many epochs, several thread counts, and the augmentation of *identical* images across ranks and
epochs (so that a difference can only come from the augmentation, not from different files).
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import index_of, write_image_folder, write_indexed_folder
from PIL import Image

from dali_ba import BatchAugmentLoader

REPO = Path(__file__).resolve().parents[1]


# Runs in a fresh process: RSS of the pytest process also carries what earlier tests left behind
# (heaps of other tests' pipelines, failed pipelines kept alive on purpose), which is not the loader's.
TWENTY_EPOCHS = """
import gc, json, sys
from pathlib import Path
from dali_ba import BatchAugmentLoader, EvalLoader

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

loader = BatchAugmentLoader(sys.argv[1], batch_size=8, num_views=4, image_size=48, augment="imagenet",
                            color_jitter=0.4, device="cpu", num_threads=2, seed=1)
val = EvalLoader(sys.argv[1], batch_size=16, image_size=48, device="cpu", num_threads=2, classes=loader.classes)
per_epoch = []
for epoch in range(20):
    batches = 0
    for images, labels in loader:
        assert images.shape == (32, 3, 48, 48)
        batches += 1
    assert batches == 8 and loader.epoch == epoch + 1
    assert sum(len(labels) for _, labels in val) == 64
    gc.collect()
    per_epoch.append(rss_mb())
assert loader.pipeline_builds == 1 and val.pipeline_builds == 1
print(json.dumps(per_epoch))
"""


@pytest.mark.slow
def test_twenty_epochs_without_memory_growth(tmp_path):
    """One pipeline for the whole run, reset at each epoch end, and an eval pipeline reused every epoch:
    host memory stays flat (a pipeline or a batch buffer leaked per epoch would show)."""
    root = write_image_folder(tmp_path / "d", classes=4, per_class=16, size_range=(60, 120))  # 64 images
    done = subprocess.run([sys.executable, "-c", TWENTY_EPOCHS, str(root)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    per_epoch = json.loads(done.stdout.strip().splitlines()[-1])
    print("\nRSS after each epoch (MB):", [round(x, 1) for x in per_epoch])
    growth = per_epoch[-1] - per_epoch[2]
    print(f"growth from epoch 3 to epoch 20: {growth:+.1f} MB (max {max(per_epoch[2:]) - per_epoch[2]:+.1f} MB)")
    # Measured: +2.7 MB over epochs 3-20. One leaked batch per epoch (0.9 MB) would add ~15 MB, one
    # leaked pipeline far more.
    assert max(per_epoch[2:]) - per_epoch[2] < 8


def test_outputs_do_not_depend_on_the_number_of_threads(tmp_path):
    """DALI's random draws are per sample, not per thread: 1, 2, 4 and 8 threads give the same
    batches, bit for bit, across an epoch boundary (verified, not assumed)."""
    root = write_image_folder(tmp_path / "d", classes=2, per_class=8, size_range=(40, 80))  # 16 images
    runs = {}
    for threads in (1, 2, 4, 8):
        loader = BatchAugmentLoader(root, batch_size=4, num_views=3, image_size=32, augment="imagenet",
                                    color_jitter=0.4, device="cpu", num_threads=threads, seed=9)
        batches = [b for _ in range(2) for b in loader]  # two epochs, four batches each
        runs[threads] = batches
    for threads in (2, 4, 8):
        for (a, la), (b, lb) in zip(runs[1], runs[threads]):
            assert torch.equal(a, b) and torch.equal(la, lb), threads
    assert len(runs[1]) == 8


def test_identical_images_get_different_augmentations_on_each_rank_and_epoch(tmp_path):
    """Every file is the same picture, so any difference between two batches is augmentation."""
    folder = tmp_path / "same" / "k"
    folder.mkdir(parents=True)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for i in range(16):
        picture.save(folder / f"{i:02d}.png")  # PNG: bit-identical pixels in every file

    def epoch_batches(rank: int, seed: int = 0):
        loader = BatchAugmentLoader(tmp_path / "same", batch_size=4, num_views=2, image_size=24, augment="imagenet",
                                    device="cpu", num_threads=1, seed=seed, shard_id=rank, num_shards=2)
        out = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            out.append(next(iter(loader))[0])
        return out

    r0, r1, r0_again = epoch_batches(0), epoch_batches(1), epoch_batches(0)
    other_seed = epoch_batches(0, seed=1)
    for epoch in range(3):
        assert torch.equal(r0[epoch], r0_again[epoch])  # reproducible
        assert not torch.equal(r0[epoch], r1[epoch])  # rank 0 vs rank 1, same epoch
        assert not torch.equal(r0[epoch], other_seed[epoch])
    for a, b in itertools.combinations(range(3), 2):
        assert not torch.equal(r0[a], r0[b]) and not torch.equal(r1[a], r1[b])  # epoch to epoch
    # and the M views of one image differ from each other
    views = r0[0].view(4, 2, 3, 24, 24)
    assert all(not torch.equal(views[i, 0], views[i, 1]) for i in range(4))


def test_the_shuffle_is_a_new_permutation_every_epoch_and_ranks_stay_disjoint(tmp_path):
    root = write_indexed_folder(tmp_path / "d", 40, classes=4)
    plain = dict(batch_size=4, num_views=1, image_size=16, augment="cifar", pad=0, mean=(0, 0, 0), std=(1, 1, 1),
                 device="cpu", num_threads=1, seed=7, num_shards=2)
    loaders = [BatchAugmentLoader(root, shard_id=r, **plain) for r in (0, 1)]
    orders = []
    for _ in range(5):
        per_rank = [[index_of(img) for images, _ in loader for img in images] for loader in loaders]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(40))  # 40 = 5 steps × 4 × 2 ranks: all used
        orders.append(tuple(per_rank[0]))
    assert len(set(orders)) == 5  # five different orders on rank 0
    assert len({frozenset(o) for o in orders}) > 1  # and rank 0's share of the images changes too
