"""The index of loose files is built once per job: rank 0 scans, every rank gets the same index
(or the same error), through a real torchrun with gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import write_image_folder

from dali_ba.dataset import scan_image_folder
from dali_ba.index import pack_index, unpack_index

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    import dali_ba.index as index
    from dali_ba import BatchAugmentLoader
    from dali_ba.errors import DatasetError

    dist.init_process_group("gloo")
    scans = []
    original = index.scan_image_folder
    index.scan_image_folder = lambda *a, **k: scans.append(a) or original(*a, **k)
    out = {"rank": dist.get_rank(), "scans": 0}
    try:
        loader = BatchAugmentLoader(sys.argv[1], batch_size=2, image_size=16, device="cpu", num_threads=1)
        out.update(files=loader.dataset.files, labels=loader.dataset.labels.tolist(), classes=loader.classes)
    except DatasetError as exc:
        out["error"] = str(exc)
    out["scans"] = len(scans)
    with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


def _torchrun(tmp_path: Path, root: Path, name: str) -> list:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / name
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(root), str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_rank_0_scans_and_every_rank_gets_the_same_index_or_error(tmp_path):
    root = write_image_folder(tmp_path / "train", classes=3, per_class=5)
    ranks = _torchrun(tmp_path, root, "good")
    assert [r["scans"] for r in ranks] == [1, 0]  # only rank 0 walked the tree
    expected = scan_image_folder(root)
    for r in ranks:
        assert r["files"] == expected.files and r["labels"] == expected.labels.tolist()
        assert r["classes"] == expected.classes
    (root / "class_9").mkdir()  # an empty class folder: rank 0's error reaches rank 1, nobody hangs
    ranks = _torchrun(tmp_path, root, "bad")
    assert ranks[0]["error"] == ranks[1]["error"] and "class_9" in ranks[0]["error"]


def test_the_shared_index_is_compact_and_exact(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=3)
    (root / "class_1" / "näme with space.jpg").write_bytes((root / "class_1" / "000.jpg").read_bytes())
    dataset = scan_image_folder(root)
    again = unpack_index(pack_index(dataset))
    assert (again.root, again.files, again.classes) == (dataset.root, dataset.files, dataset.classes)
    assert again.labels.tolist() == dataset.labels.tolist()
