"""Packed datasets (``dali-ba data pack``): WebDataset shards read by DALI, locally or from ``s3://``.

A packed dataset is a folder or ``s3://``/``gs://`` prefix holding ``dataset.json``
(``dali_ba.data.manifest``) and the shards it lists. Loaders read one *split* of it (``train`` for
``BatchAugmentLoader``, ``val`` for ``EvalLoader`` by default) with ``fn.readers.webdataset``, each
rank its own contiguous share of the samples (DALI's ``shard_id``/``num_shards``).

Shuffling (``packed_shuffle``): ``buffer`` (the default, what containers are made for) reads each
rank's share in tar order through a buffer of ``shuffle_buffer`` samples from which DALI draws at
random, and moves every rank to the next share each epoch, so the reads stay sequential; ``global``
makes DALI permute all samples every epoch (the closest to loose files' exact global permutation),
at the price of random reads inside the tars. docs/imagenet.md compares the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from dali_ba.errors import DatasetError, UserError

PACKED_SHUFFLES = ("buffer", "global")
READER_NAME = "Reader"


@dataclass(frozen=True)
class PackedDataset:
    """One split of a packed dataset: where its shards and indexes are, its classes and size."""

    root: str
    split: str
    shards: List[str]
    indexes: List[str]
    classes: List[str]
    num_samples: int

    def __len__(self) -> int:
        return self.num_samples

    @property
    def files(self) -> List[str]:
        """Packed samples have no file names of their own: the shards are what is read."""
        return self.shards


def is_packed(root: str) -> bool:
    """True for a folder holding ``dataset.json`` or an object-storage URL (only packed datasets
    are read from object storage without a file list)."""
    from pathlib import Path

    from dali_ba.data.manifest import MANIFEST_NAME
    from dali_ba.storage import is_url

    return is_url(root) or (Path(root) / MANIFEST_NAME).is_file()


def open_packed(root: str, split: str) -> PackedDataset:
    """The ``split`` of the packed dataset at ``root``; DatasetError naming the root when it is not one."""
    from dali_ba.data import manifest as mf

    try:
        manifest = mf.load(str(root))
        shards, indexes = mf.shard_urls(str(root), manifest, split)
    except UserError as exc:
        raise DatasetError(str(exc)) from None
    entry = manifest["splits"][split]
    if "lbl" not in entry.get("extensions", []):
        raise DatasetError(f"{root}: split {split!r} was packed without .lbl labels; pack it again with this "
                           f"dali-ba (`dali-ba data pack`)")
    if not shards or entry["num_samples"] < 1:
        raise DatasetError(f"{root}: split {split!r} holds no samples")
    return PackedDataset(str(root).rstrip("/"), split, shards, indexes, list(manifest["classes"]),
                         int(entry["num_samples"]))


def read_packed(dataset: PackedDataset, shard_id: int, num_shards: int, train: bool, shuffle: str, buffer: int):
    """DALI nodes (encoded images, int32 labels) of this rank's share of ``dataset``.

    Train: shuffled (see the module docstring), the share moving each epoch. Eval: in order, the
    share fixed, the last batch padded (the loader drops the padding), so every image is read once."""
    from nvidia.dali import fn, types

    if shuffle not in PACKED_SHUFFLES:
        raise UserError(f"packed_shuffle: expected one of {', '.join(PACKED_SHUFFLES)}; got {shuffle!r}")
    if not train:
        order = dict(random_shuffle=False, stick_to_shard=True, pad_last_batch=True)
    elif shuffle == "global":
        order = dict(shuffle_after_epoch=True)
    else:
        order = dict(random_shuffle=True, initial_fill=buffer, stick_to_shard=False)
    encoded, label = fn.readers.webdataset(
        paths=dataset.shards, index_paths=dataset.indexes, ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards, name=READER_NAME, **order)
    return encoded, label


@dataclass(frozen=True)
class PackedSource:
    """What a pipeline reads for one rank of a packed dataset (``build_pipeline`` calls ``read``)."""

    dataset: PackedDataset
    shard_id: int
    num_shards: int
    train: bool
    shuffle: str = "buffer"
    buffer: int = 1024

    def read(self):
        return read_packed(self.dataset, self.shard_id, self.num_shards, self.train, self.shuffle, self.buffer)

    def shard_size(self) -> int:
        """Samples of this rank's share (DALI's split: contiguous, sizes differing by one at most)."""
        n = self.dataset.num_samples
        return n * (self.shard_id + 1) // self.num_shards - n * self.shard_id // self.num_shards
