"""Batch sources: which files a pipeline reads for each (epoch, iteration) DALI asks about.

DALI's ``external_source`` calls a source with a ``BatchInfo`` (``epoch_idx`` counted from the
pipeline's build or checkpoint, ``iteration`` within that epoch) and gets this rank's file paths
(as uint8 arrays, for ``fn.io.file.read``) and labels. A source is a pure function of that
position, so DALI's checkpoints, which record it, resume the data exactly.

``TrainBatches`` deals the epoch's global permutation (``sharding``) to this rank; its pipeline's
epoch 0 is the run's epoch ``first_epoch``, entered at batch ``first_step``. ``EvalBatches`` walks
this rank's contiguous eval slice once per epoch, the last batch short (no padding).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from dali_ba.sharding import train_shard_indices


def encode_path(path: str) -> np.ndarray:
    """A file path as the 1-D uint8 array ``fn.io.file.read`` takes."""
    return np.frombuffer(path.encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _batch(files: Sequence[str], labels: np.ndarray, indices: np.ndarray) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    return ([encode_path(files[i]) for i in indices],
            [np.asarray([labels[i]], dtype=np.int32) for i in indices])


class TrainBatches:
    """This rank's training batches, epoch after epoch (drop-last, ``steps`` per epoch)."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, *, batch_size: int, steps: int, shard_id: int,
                 num_shards: int, seed: int, first_epoch: int = 0, first_step: int = 0):
        self.files, self.labels = files, labels
        self.batch_size, self.steps = batch_size, steps
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.first_epoch, self.first_step = first_epoch, first_step
        self._cached: Tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def position(self, epoch_idx: int, iteration: int) -> Tuple[int, int]:
        """(run epoch, step within it) of the pipeline's (epoch_idx, iteration)."""
        return self.first_epoch + epoch_idx, iteration + (self.first_step if epoch_idx == 0 else 0)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in reading order (the last epoch's kept)."""
        if self._cached[0] != epoch:
            order = train_shard_indices(len(self.files), self.batch_size, self.shard_id, self.num_shards, self.seed,
                                        epoch)
            self._cached = (epoch, order)
        return self._cached[1]

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        return self.epoch_indices(epoch)[step * self.batch_size:(step + 1) * self.batch_size]

    def __call__(self, info):
        epoch, step = self.position(info.epoch_idx, info.iteration)
        if step >= self.steps:
            raise StopIteration
        return _batch(self.files, self.labels, self.batch_indices(epoch, step))


class EvalBatches:
    """This rank's eval slice ``indices`` in batches of ``batch_size`` (the last one shorter)."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, indices: np.ndarray, batch_size: int):
        self.files, self.labels, self.indices, self.batch_size = files, labels, indices, batch_size

    def batch_indices(self, step: int) -> np.ndarray:
        return self.indices[step * self.batch_size:(step + 1) * self.batch_size]

    def __call__(self, info):
        chosen = self.batch_indices(info.iteration)
        if len(chosen) == 0:
            raise StopIteration
        return _batch(self.files, self.labels, chosen)
