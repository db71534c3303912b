"""Loaders on packed datasets (`dali-ba data pack`): the same images as the loose files, every image
once per epoch over the ranks, exact resume, evaluation once per image, local and on S3."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import index_of, tiny, write_image_folder, write_indexed_folder, write_yaml

from dali_ba import BatchAugmentLoader, EvalLoader
from dali_ba.errors import DatasetError, UserError

REPO = Path(__file__).resolve().parents[1]
PLAIN = dict(image_size=16, augment="cifar", pad=0, mean=(0, 0, 0), std=(1, 1, 1), device="cpu", num_threads=1)
TRAIN = dict(batch_size=4, num_views=2, seed=3, **PLAIN)


def pack(src: Path, out: str, *extra: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "dali_ba.cli", "data", "pack", str(src), out, "--shard-size", "8KB",
                           *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """40 flat-grey JPEGs whose grey level is their index (loose), and the same packed."""
    root = tmp_path_factory.mktemp("indexed")
    loose = write_indexed_folder(root / "loose", 40, classes=4)
    return loose, pack(loose, str(root / "packed"))


def _epoch_indices(loaders) -> list:
    return [[index_of(x) for images, _ in loader for x in images[::2]] for loader in loaders]


@pytest.mark.parametrize("shuffle", ["buffer", "global"])
def test_every_image_once_per_epoch_over_two_ranks_as_with_loose_files(indexed, shuffle):
    loose, packed = indexed
    for root, options in ((loose, {}), (packed, dict(packed_shuffle=shuffle, shuffle_buffer=8))):
        loaders = [BatchAugmentLoader(root, shard_id=r, num_shards=2, **TRAIN, **options) for r in (0, 1)]
        assert len(loaders[0]) == len(loaders[1]) == 5 and loaders[0].classes == [f"class_{i}" for i in range(4)]
        orders = []
        for _ in range(3):
            per_rank = _epoch_indices(loaders)
            assert sorted(per_rank[0] + per_rank[1]) == list(range(40))  # disjoint, complete
            orders.append(per_rank[0])
        assert len({tuple(o) for o in orders}) == 3  # a new order every epoch
        assert all(loader.pipeline_builds == 1 for loader in loaders)


def test_labels_follow_their_images_in_packed_batches(indexed):
    _, packed = indexed
    loader = BatchAugmentLoader(packed, shard_id=0, num_shards=1, **TRAIN)
    for images, labels in loader:
        assert [index_of(x) % 4 for x in images] == labels.tolist()  # class = index % 4


@pytest.mark.parametrize("shuffle", ["buffer", "global"])
def test_packed_resume_mid_epoch_and_across_the_boundary_is_exact(indexed, shuffle):
    _, packed = indexed
    options = dict(shard_id=1, num_shards=2, packed_shuffle=shuffle, shuffle_buffer=8, color_jitter=0.0, **TRAIN)
    loader = BatchAugmentLoader(packed, **options)
    stream = (batch for _ in itertools.count() for batch in loader)
    states, batches = [], []
    for _ in range(12):  # 5 steps per epoch: epochs 0, 1 and part of 2
        states.append(loader.state_dict())
        batches.append(next(stream)[0])
    for k in (2, 5, 9):
        again = BatchAugmentLoader(packed, **options)
        assert again.resume(states[k]).exact
        more = (batch for _ in itertools.count() for batch in again)
        assert all(torch.equal(next(more)[0], expected) for expected in batches[k:k + 3])
    with pytest.raises(UserError, match="chosen by DALI's reader"):
        loader.batch_indices(0, 0)


def test_packed_evaluation_sees_every_image_once_over_ranks_and_matches_loose(tmp_path):
    """The same images give the same evaluation: loose and packed val folders, 1 and 2 ranks."""
    from trainers import dist as tdist
    from trainers.evaluate import evaluate
    from trainers.models import SmallNet

    loose = write_image_folder(tmp_path / "val", classes=3, per_class=7, size_range=(16, 30))  # 21 images
    packed = pack(loose, str(tmp_path / "packed"), "--split", "val")
    torch.manual_seed(0)
    model = SmallNet(3)
    results = {}
    for name, root in (("loose", loose), ("packed", packed)):
        for shards in (1, 2):
            sums = []
            for r in range(shards):
                val = EvalLoader(root, batch_size=4, shard_id=r, num_shards=shards, **PLAIN)
                assert val.pipeline_builds == 0
                for _ in range(2):
                    sums.append(evaluate(model, val, tdist.DistEnv(), lambda: torch.autocast("cpu", enabled=False)))
                assert val.pipeline_builds == 1 and sums[-1] == {**sums[-2], "eval_time": sums[-1]["eval_time"]}
            images = sum(s["val_images"] for s in sums[::2])
            top1 = sum(s["val_top1"] * s["val_images"] for s in sums[::2]) / images
            results[(name, shards)] = (images, round(top1, 4))
    assert len(set(results.values())) == 1 and next(iter(results.values()))[0] == 21, results


def test_packed_dataset_errors_are_one_clear_line(tmp_path, indexed):
    _, packed = indexed
    with pytest.raises(DatasetError, match="no split 'val'"):
        EvalLoader(packed, batch_size=4, **PLAIN)
    with pytest.raises(DatasetError, match="evaluated whole"):
        EvalLoader(packed, split="train", batch_size=4, indices=[1, 2], **PLAIN)
    manifest = json.loads((Path(packed) / "dataset.json").read_text())
    manifest["splits"]["train"]["extensions"] = ["jpg", "cls"]  # packed by an older dali-ba
    old = tmp_path / "old"
    old.mkdir()
    (old / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="pack it again"):
        BatchAugmentLoader(str(old), **TRAIN)


@pytest.mark.slow
def test_a_packed_dataset_trains_with_dali_ba_train(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", classes=4, per_class=16, size_range=(32, 48))
    write_image_folder(data / "val", classes=4, per_class=5, seed=1, size_range=(32, 48))
    packed = tmp_path / "packed"
    pack(data / "train", str(packed))
    pack(data / "val", str(packed), "--split", "val")
    values = tiny(data, tmp_path / "run", train={"max_steps": 6})
    values["data"].update(train_root=str(packed), val_root=str(packed))
    config = write_yaml(values, tmp_path / "run.yaml")
    done = subprocess.run([sys.executable, "-m", "dali_ba.cli", "train", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: step 6/16" in done.stdout and "on 20 images" in done.stdout


# ------------------------------------------------------------------------------------------ S3
def test_packed_and_file_list_datasets_read_from_s3_and_resume(indexed, s3):
    loose, packed = indexed
    url = pack(loose, s3.url("packed"))
    loader = BatchAugmentLoader(url, shard_id=0, num_shards=2, **TRAIN)
    stream = (batch for _ in itertools.count() for batch in loader)
    first = [next(stream)[0] for _ in range(3)]
    state = loader.state_dict()
    expected = [next(stream)[0] for _ in range(3)]
    again = BatchAugmentLoader(url, shard_id=0, num_shards=2, **TRAIN)
    assert again.resume(state).exact
    more = (batch for _ in itertools.count() for batch in again)
    assert all(torch.equal(next(more)[0], e) for e in expected) and len(first) == 3

    for path in sorted(loose.rglob("*.jpg")):  # loose objects and a file list, both on S3
        s3.client.upload_file(str(path), s3.name, f"loose/{path.relative_to(loose)}")
    listing = "".join(f"{p.relative_to(loose)} {int(p.parent.name[-1])}\n" for p in sorted(loose.rglob("*.jpg")))
    s3.client.put_object(Bucket=s3.name, Key="lists/train.txt", Body=listing.encode())
    loaders = [BatchAugmentLoader(s3.url("loose"), file_list=s3.url("lists/train.txt"), shard_id=r, num_shards=2,
                                  **TRAIN) for r in (0, 1)]
    per_rank = _epoch_indices(loaders)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))


def test_s3_missing_manifest_or_shard_is_one_line_naming_the_url(indexed, s3):
    loose, _ = indexed
    with pytest.raises(DatasetError, match=f"^{s3.url('nothing')}/dataset.json: not found"):
        BatchAugmentLoader(s3.url("nothing"), **TRAIN)
    url = pack(loose, s3.url("packed"))
    s3.client.delete_object(Bucket=s3.name, Key="packed/train-000002.tar")
    started = time.monotonic()
    with pytest.raises(UserError, match=url) as info:
        loader = BatchAugmentLoader(url, shard_id=0, num_shards=1, **TRAIN)
        for _ in loader:
            pass
    assert "\n" not in str(info.value) and time.monotonic() - started < 60


def _s3_trainer(tmp_path: Path, url: str, endpoint: str, steps: int, **env) -> subprocess.Popen:
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = tiny(tmp_path, tmp_path / "run", train={"max_steps": steps, "epochs": 50, "checkpoint_every": 2})
    values["data"].update(train_root=url, val_root=None, batch_size=4)
    config = write_yaml(values, tmp_path / "run.yaml")
    from s3_server import ACCESS_KEY, REGION, SECRET_KEY

    environment = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                   "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION, **env}
    return subprocess.Popen([sys.executable, "-m", "trainers.train", "--config", str(config)], cwd=REPO,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_wrong_credentials_and_a_server_that_goes_away_end_in_one_line(indexed, tmp_path):
    """Each is one line naming the URL and exit 2 within bounded time, never a hang or a traceback."""
    from s3_server import S3Server, new_bucket

    loose, _ = indexed
    server = S3Server().start()
    strict = S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()  # refuses our keys
    try:
        bucket = new_bucket(server)
        url = pack(loose, bucket.url("packed"), env=server.env())
        refused = _s3_trainer(tmp_path / "refused", f"s3://{bucket.name}/packed", strict.endpoint, 4)
        _, err = refused.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert refused.returncode == 2 and "access denied" in lines[-1] and url in lines[-1], err[-2000:]

        proc = _s3_trainer(tmp_path / "gone", url, server.endpoint, 10_000)
        metrics = tmp_path / "gone" / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        server.stop()
        started = time.monotonic()
        _, err = proc.communicate(timeout=180)
        lines = [line for line in err.strip().splitlines() if "error" in line]
        assert proc.returncode == 2 and len(lines) == 1 and url in lines[0], err[-3000:]
        assert "Traceback" not in err and time.monotonic() - started < 180
    finally:
        server.stop()
        strict.stop()
