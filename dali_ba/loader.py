"""The thin PyTorch side: one DALI pipeline per loader, torch tensors out, state and resume.

``BatchAugmentLoader`` yields ``(images, labels)``: ``flat`` layout ``[B·M, C, H, W]`` ordered
image-major (b0v0, b0v1, …, b1v0, …) with labels repeated M times; ``grouped`` layout
``[B, M, C, H, W]`` with ``[B]`` labels. One ``for`` loop is one epoch (or what is left of it).
The pipeline is built on first use and reset, not rebuilt, at each epoch's end; only a jump
(``set_epoch`` to another position, a resume from another position) builds it again. Tensors are
copied out of DALI's buffers (``buffers.ReusedBuffers``), so a batch may be kept as long as you like.
``EvalLoader`` yields every image of its shard exactly once per ``for`` loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from dali_ba.buffers import ReusedBuffers
from dali_ba.dataset import align_classes
from dali_ba.errors import (
    ConfigError,
    DatasetError,
    DecodeError,
    LoaderOutOfMemory,
    LoaderStateError,
    UserError,
    dali_error_line,
)
from dali_ba.index import AnyDataset, open_dataset
from dali_ba.options import PipelineOptions, check_options, graph_settings
from dali_ba.packed import READER_NAME, PackedDataset, PackedSource
from dali_ba.pipeline import abandon_pipeline, build_pipeline, output_names, resolve_device, resolve_device_id
from dali_ba.sharding import augment_seed, eval_shard_indices, resolve_shard, steps_per_epoch
from dali_ba.source import EvalBatches, TrainBatches
from dali_ba.state import STATE_VERSION, Resumed, check_state, continuation, inexact

LAYOUTS = ("flat", "grouped")
EVAL_SEED_KEY = 1_000_003  # the "epoch" slot of the eval seed: distinct from every train epoch


@dataclass(eq=False, kw_only=True)
class _DaliLoader(PipelineOptions):
    """What both loaders share: the dataset, the shard, the device, one pipeline and its iterator."""

    root: str = field(kw_only=False)
    DEFAULT_SPLIT: ClassVar[str] = "train"

    def __post_init__(self) -> None:
        check_options(self)
        self.mean, self.std = tuple(float(x) for x in self.mean), tuple(float(x) for x in self.std)
        self.rand_augment = tuple(self.rand_augment) if self.rand_augment else None  # [] and None: off
        from_process_group = self.shard_id is None and self.num_shards is None
        self.shard_id, self.num_shards = resolve_shard(self.shard_id, self.num_shards)
        self.device = resolve_device(self.device)
        self.device_id = resolve_device_id(self.device, self.device_id)
        # Every rank builds this loader when its shard comes from the process group: scan once, share.
        self.dataset: AnyDataset = open_dataset(self.root, self.file_list, self.split or self.DEFAULT_SPLIT,
                                                share=from_process_group, device_id=self.device_id)
        self.packed = isinstance(self.dataset, PackedDataset)
        self.pipeline_builds = 0  # how many DALI pipelines this loader built (one per run, normally)
        self._pipe = self._iterator = None
        self._buffers = ReusedBuffers()

    @property
    def classes(self) -> list:
        return list(self.dataset.classes)

    def _open(self, source, num_views: int, train: bool, seed: int, checkpoint: Optional[bytes] = None,
              decode_per_view: Optional[str] = None) -> None:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        try:
            self._pipe = build_pipeline(source, self, num_views=num_views, seed=seed, train=train,
                                        checkpoint=checkpoint, decode_per_view=decode_per_view)
        except RuntimeError as exc:
            if self.packed or "://" in self.dataset.root:  # a reader that opens its shards at build time
                raise DatasetError(f"cannot read {self.dataset.root}: {dali_error_line(exc)}") from None
            raise
        self.pipeline_builds += 1
        # A packed dataset's epochs are its reader's: whole batches for training, every sample once in eval.
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        reader = dict(reader_name=READER_NAME, last_batch_policy=policy) if self.packed else {}
        self._iterator = DALIGenericIterator([self._pipe], output_names(num_views), auto_reset=True,
                                             prepare_first_batch=False, **reader)

    def _close(self, failed: bool = False) -> None:
        """Drop the pipeline (a failed one is abandoned, not destroyed: see ``abandon_pipeline``)."""
        if failed and self._pipe is not None:
            abandon_pipeline(self._pipe)
        self._pipe = self._iterator = None
        self._buffers.clear()

    def _next(self, suspects: Sequence[str]) -> dict:
        """The next DALI output; a failure closes the dead pipeline and names the file(s) at fault."""
        try:
            return next(self._iterator)[0]
        except StopIteration:
            raise RuntimeError("the DALI pipeline ended its epoch early") from None
        except RuntimeError as exc:
            self._close(failed=True)
            if LoaderOutOfMemory.matches(exc):  # not the files' fault: no culprit search
                raise LoaderOutOfMemory.of(self, exc, dali_error_line(exc)) from None
            from dali_ba.data.verify import explain_failure

            raise explain_failure(self.dataset.root, self.packed, dali_error_line(exc), suspects) from None

    def _end_epoch(self, spare: int = 0) -> None:
        """Take the pipeline's end of epoch: the iterator resets it and starts prefetching the next.
        ``spare``: whole batches the reader may still hold (a packed share one batch longer than
        the steps every rank runs), read and dropped."""
        for _ in range(spare + 1):
            try:
                next(self._iterator)
            except StopIteration:
                return
        raise RuntimeError("the DALI pipeline did not end its epoch where the loader expected it to")

    def _to_torch(self, out: dict, num_views: int, grouped: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copy the M view outputs into one batch and give it its layout (channels_last stays a view)."""
        images = self._buffers.stack([out[name] for name in output_names(num_views)[:-1]])
        labels = out["labels"].reshape(-1).to(device=images.device, dtype=torch.long, non_blocking=True)
        if self.channels_last:  # [B, M, H, W, C] → [B, M, C, H, W] with channels-last strides
            images = images.permute(0, 1, 4, 2, 3)
        if grouped:
            return images, labels
        return images.flatten(0, 1), labels.repeat_interleave(images.shape[1])

    def _graph(self, **extra) -> dict:
        """The settings that shape this loader's graph (saved with its state)."""
        if self.packed:
            extra.update(split=self.dataset.split, packed_shuffle=self.packed_shuffle,
                         shuffle_buffer=self.shuffle_buffer)
        return graph_settings(self, **extra)

    @classmethod
    def _kwargs_from(cls, data) -> dict:
        """The options of ``data`` (a DataConfig) that this loader takes, by name."""
        return {f.name: getattr(data, f.name) for f in fields(cls) if f.init and hasattr(data, f.name)}


@dataclass(eq=False, kw_only=True)
class BatchAugmentLoader(_DaliLoader):
    """B unique images per step per rank, each as M independently augmented views.

    Shards by global rank (``torch.distributed`` when initialised, else rank 0 of 1) unless
    ``shard_id``/``num_shards`` are given; ``len(loader)`` is the steps per epoch of this rank.
    A file that fails to decode raises ``DecodeError`` naming it; ``state_dict()`` then points at
    the batch that failed (replace the file and resume). ``decode_per_view`` ("full" or "crop")
    builds the naive graph the benchmarks compare against: one decoder per view.
    """

    num_views: int = 1  # M: views of each image in the same batch
    layout: str = "flat"  # "flat": [B·M, C, H, W]; "grouped": [B, M, C, H, W]
    decode_per_view: Optional[str] = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout: expected one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        super().__post_init__()
        self._steps = steps_per_epoch(len(self.dataset), self.batch_size, self.num_shards)
        if self._steps == 0:
            raise DatasetError(f"batch_size={self.batch_size} × {self.num_shards} shard(s) needs at least "
                               f"{self.batch_size * self.num_shards} images; {self.dataset.root} has "
                               f"{len(self.dataset)}")
        self._epoch = self._step = 0  # the position: epoch, and batches of it handed out
        self._source = self._batches(0, 0)
        self._restore: Optional[bytes] = None  # the DALI checkpoint the next build restores
        self._memo: Tuple[Optional[tuple], Optional[bytes]] = (None, None)

    @classmethod
    def from_config(cls, data, **overrides) -> "BatchAugmentLoader":
        """From a DataConfig (``train_root``, ``train_list`` and the options of the same names)."""
        return cls(**{**cls._kwargs_from(data), "root": data.train_root, "file_list": data.train_list, **overrides})

    def __len__(self) -> int:
        return self._steps

    @property
    def epoch(self) -> int:
        """The epoch the running ``for`` loop reads (or the next one will)."""
        return self._epoch

    @property
    def step(self) -> int:
        """Batches of ``epoch`` already handed out."""
        return self._step

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Dataset indices (into ``loader.dataset.files``) of this rank's images in that step."""
        if not 0 <= step < self._steps:
            raise ValueError(f"step: expected 0 <= step < {self._steps} (steps per epoch); got {step}")
        if self.packed:
            raise UserError(f"batch_indices: the images of a step of the packed dataset {self.root} are chosen "
                            "by DALI's reader as it reads; only loose files have them up front")
        return self._source.batch_indices(epoch, step)

    def _batches(self, first_epoch: int, first_step: int):
        self._origin = (first_epoch, first_step)
        if self.packed:
            return PackedSource(self.dataset, self.shard_id, self.num_shards, train=True, shuffle=self.packed_shuffle,
                                buffer=self.shuffle_buffer)
        return TrainBatches(self.dataset.files, self.dataset.labels, batch_size=self.batch_size, steps=self._steps,
                            shard_id=self.shard_id, num_shards=self.num_shards, seed=self.seed,
                            first_epoch=first_epoch, first_step=first_step)

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Start the next ``for`` loop at batch ``step`` of ``epoch`` (like DistributedSampler).

        At the loader's own position this does nothing; elsewhere it drops the pipeline (its
        prefetched batches belong elsewhere) and the next loop builds one there, with augmentation
        draws of its own (use ``load_state_dict`` for a bit-exact resume). Loose files skip the
        earlier batches without reading them; a packed dataset's reader reads and drops them."""
        if not 0 <= int(step) < self._steps:
            raise ValueError(f"step: expected 0 <= step < {self._steps} (steps per epoch); got {step}")
        if (int(epoch), int(step)) != self._position():
            self._jump(int(epoch), int(step))

    def _jump(self, epoch: int, step: int, checkpoint: Optional[bytes] = None, origin: Optional[tuple] = None) -> None:
        self._close()
        self._epoch, self._step, self._restore = epoch, step, checkpoint
        self._source = self._batches(*(origin or (epoch, step)))

    def _build(self) -> None:
        """The pipeline for the current source, restoring the pending DALI checkpoint if any."""
        restoring, self._restore = self._restore, None
        self._open(self._source, self.num_views, train=True, checkpoint=restoring,
                   seed=augment_seed(self.seed, self.shard_id, *self._origin), decode_per_view=self.decode_per_view)
        if self.packed and restoring is None:  # DALI's reader starts at its first batch: read up to the position
            for _ in range(self._origin[1]):
                next(self._iterator)

    def _position(self) -> Tuple[int, int]:
        """(epoch, step) of the next batch; the end of an epoch is the start of the next."""
        return (self._epoch + 1, 0) if self._step == self._steps else (self._epoch, self._step)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._epoch, self._step = self._position()
        if self._iterator is None:
            self._build()
        while self._step < self._steps:
            before = self._dali_state()
            # The failing batch is this one or one the pipeline prefetched after it.
            try:
                out = self._next(self._suspects())
            except DecodeError:
                self._restore = before  # a later build resumes with the batch that failed
                raise
            batch = self._to_torch(out, self.num_views, grouped=self.layout == "grouped")
            self._step += 1
            if self._step == self._steps:
                self._end_epoch(spare=int(self.packed))  # (epoch, steps) is (epoch + 1, 0): see _position
            yield batch
        self._epoch, self._step = self._position()

    def _suspects(self) -> list:
        """The files of the batch fetched next and of those the pipeline may have prefetched."""
        if self.packed:
            return []
        ahead = range(self._step, min(self._steps, self._step + 1 + self.prefetch))
        return [self.dataset.files[i] for s in ahead for i in self._source.batch_indices(self._epoch, s)]

    def _dali_state(self) -> Optional[bytes]:
        """The DALI checkpoint of the current position (taken once per position)."""
        if self._iterator is None:
            return self._restore
        position = (*self._position(), self.pipeline_builds)
        if self._memo[0] != position:
            self._memo = (position, self._iterator.checkpoints()[0])
        return self._memo[1]

    def state_dict(self) -> dict:
        """Everything needed to continue with the very next batch (bit for bit on the CPU)."""
        from nvidia.dali import __version__ as dali_version

        epoch, step = self._position()
        return {"version": STATE_VERSION, "epoch": epoch, "step": step, "dali": self._dali_state(),
                "origin": list(self._origin), "dali_version": dali_version,
                "seed": self.seed, "num_files": len(self.dataset), "batch_size": self.batch_size,
                "num_views": self.num_views, "shard_id": self.shard_id, "num_shards": self.num_shards,
                "graph": self._graph(decode_per_view=self.decode_per_view)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was saved; LoaderStateError when that is not possible
        (another loader, other graph settings, another file list or DALI version: see ``resume``),
        and then the loader is where it was, unless DALI failed to restore the state."""
        mine = self.state_dict()
        check_state(state, mine, self._steps)
        problem = inexact(state, mine)
        if problem is not None:
            raise LoaderStateError(f"cannot resume exactly: {problem[0]}")
        resumed = self.resume(state)
        if not resumed.exact:
            raise LoaderStateError(f"cannot resume exactly: {resumed.message}")

    def resume(self, state: dict) -> Resumed:
        """Continue from ``state`` as closely as possible and say how.

        Exact when the file list, the DALI version and the pipeline's checkpoint all still fit.
        When the file list changed (a broken image left out) the data continues at the same step
        of the same epoch in the new list's shuffle; when the DALI checkpoint cannot be restored
        (another DALI version), at the same batches with fresh augmentation draws. Another loader
        configuration or other graph settings raise ``LoaderStateError``."""
        mine = self.state_dict()
        check_state(state, mine, self._steps)
        epoch, step = int(state["epoch"]), int(state["step"])
        problem = inexact(state, mine)
        if problem is not None:
            self._jump(epoch, step)
            return Resumed(False, f"{problem[0]}: {continuation(epoch, step, same_order=problem[1])}")
        self._jump(epoch, step, state["dali"], tuple(state["origin"]))
        if state["dali"] is None:
            return Resumed(True)
        try:  # build now: a checkpoint DALI cannot restore fails here, not in the training loop
            self._build()
        except (RuntimeError, ValueError) as exc:
            self._jump(epoch, step)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Resumed(False, f"DALI could not restore the saved state ({reason}): "
                                  f"{continuation(epoch, step, same_order=True)}")
        return Resumed(True)


@dataclass(eq=False, kw_only=True)
class EvalLoader(_DaliLoader):
    """Each image of this shard exactly once per ``for`` loop, with the eval transform of ``augment``.

    Yields ``[b, C, H, W]`` and ``[b]`` (the last batch may be smaller; shards may differ by one
    batch, so never run a collective per batch). With ``views > 1``: ``[b, views, C, H, W]``
    random train views of each image, for test-time averaging (new draws every evaluation).
    ``classes``: the training set's classes, so that label k means the same class in both (the
    validation set may lack some). ``indices``: evaluate only these dataset indices.
    """

    DEFAULT_SPLIT: ClassVar[str] = "val"
    views: int = 1
    classes: Optional[Sequence[str]] = None
    indices: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        train_classes, subset = self.classes, self.indices
        super().__post_init__()
        if self.packed and (subset is not None or (train_classes is not None and
                                                   list(train_classes) != self.dataset.classes)):
            raise DatasetError(f"{self.root}: a packed split is evaluated whole, with the classes of its manifest "
                               f"(indices= is for loose files; pack train and val into one folder to share classes)")
        if train_classes is not None and not self.packed:
            self.dataset = align_classes(self.dataset, list(train_classes), "the training set", self.root)
        self.classes = list(self.dataset.classes)  # the training set's, when given
        chosen = np.arange(len(self.dataset)) if subset is None else np.asarray(subset, dtype=np.int64)
        self.indices = chosen[eval_shard_indices(len(chosen), self.shard_id, self.num_shards)]
        if self.packed:
            self._source = PackedSource(self.dataset, self.shard_id, self.num_shards, train=False)
        else:
            self._source = EvalBatches(self.dataset.files, self.dataset.labels, self.indices, self.batch_size)
        self._complete = True  # the last `for` loop ran to the end (the pipeline is at an epoch start)

    @classmethod
    def from_config(cls, data, **overrides) -> "EvalLoader":
        """From a DataConfig (``val_root`` and the options of the same names)."""
        if data.val_root is None:
            raise ConfigError("data.val_root: not set, so there is nothing to evaluate on")
        return cls(**{**cls._kwargs_from(data), "root": data.val_root, "file_list": None, **overrides})

    @property
    def num_samples(self) -> int:
        """Images in this shard."""
        return len(self.indices)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:
            return
        if not self._complete:  # a loop left early: its pipeline is mid-epoch, start again
            self._close()
        if self._iterator is None:
            seed = augment_seed(self.seed, self.shard_id, EVAL_SEED_KEY)
            self._open(self._source, self.views, train=False, seed=seed)
        self._complete = False
        for step in range(len(self)):
            ahead = range(step, min(len(self), step + 1 + self.prefetch)) if not self.packed else ()
            suspects = [self.dataset.files[i] for s in ahead for i in self._source.batch_indices(s)]
            images, labels = self._to_torch(self._next(suspects), self.views, grouped=True)
            if step == len(self) - 1:
                self._end_epoch()
                self._complete = True
            yield (images[:, 0] if self.views == 1 else images), labels

