"""Which images a loader reads, found once per job.

A packed dataset (``dali_ba.packed``) is described by its manifest. Loose files (an ImageFolder
tree or a file list, local or, with a file list, on ``s3://``) are indexed by a scan; under
torch.distributed, when a loader takes its shard from the process group, only global rank 0 scans
and broadcasts the index (paths relative to the root, labels, classes), so N ranks do not each walk
the tree. A scan error on rank 0 reaches every rank as the same error.
"""
from __future__ import annotations

import os
import pickle
import zlib
from typing import Optional, Union

import numpy as np

from dali_ba.dataset import Dataset, scan_image_folder
from dali_ba.errors import DatasetError
from dali_ba.packed import PackedDataset, is_packed, open_packed

AnyDataset = Union[Dataset, PackedDataset]


def open_dataset(root: str, file_list: Optional[str], split: str, share: bool = False,
                 device_id: Optional[int] = None) -> AnyDataset:
    """The dataset at ``root``: a packed split, or loose files (scanned once per job with ``share``
    under an initialised torch.distributed; ``device_id``: the GPU of an NCCL process group)."""
    root = os.path.expanduser(str(root))
    if file_list is None and is_packed(root):
        return open_packed(root, split)
    if not share or not _distributed():
        return scan_image_folder(root, file_list)
    return _broadcast_scan(root, file_list, device_id)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_scan(root: str, file_list: Optional[str], device_id: Optional[int]) -> Dataset:
    """Rank 0 scans; every rank gets its result (or its error) in one broadcast."""
    import torch
    import torch.distributed as dist

    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", pack_index(scan_image_folder(root, file_list)))
        except DatasetError as exc:
            box[0] = ("error", str(exc))
    device = torch.device("cuda", device_id) if dist.get_backend() == "nccl" and device_id is not None else None
    dist.broadcast_object_list(box, src=0, device=device)
    kind, payload = box[0]
    if kind == "error":
        raise DatasetError(payload)
    return unpack_index(payload)


def pack_index(dataset: Dataset) -> bytes:
    """A compact, picklable form of ``dataset``: paths relative to its root, compressed."""
    prefix = dataset.root.rstrip("/") + "/"
    relative = [f[len(prefix):] if f.startswith(prefix) else f for f in dataset.files]
    # NUL separates the names: it is the one character a file name cannot hold (a newline can).
    names = zlib.compress("\0".join(relative).encode("utf-8", "surrogateescape"), 1)
    return pickle.dumps((dataset.root, names, dataset.labels, list(dataset.classes)), protocol=5)


def unpack_index(data: bytes) -> Dataset:
    root, names, labels, classes = pickle.loads(data)  # noqa: S301 - from our own rank 0
    text = zlib.decompress(names).decode("utf-8", "surrogateescape")
    relative = text.split("\0") if text else []
    prefix = root.rstrip("/") + "/"
    files = [name if name.startswith("/") or "://" in name else prefix + name for name in relative]
    return Dataset(root, files, np.asarray(labels, dtype=np.int32), classes)
