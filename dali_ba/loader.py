"""The thin PyTorch side: iterate DALI pipelines, hand out torch tensors, save and restore state.

``BatchAugmentLoader`` yields ``(images, labels)``: ``flat`` layout ``[B·M, C, H, W]`` ordered
image-major (b0v0, b0v1, …, b1v0, …) with labels repeated M times; ``grouped`` layout
``[B, M, C, H, W]`` with ``[B]`` labels. One ``for`` loop is one epoch. Tensors are copied out of
DALI's buffers (the pipeline emits each view separately and this copy assembles them; DALI's
iterator hands out zero-copy views, and whether a later batch may reuse that memory depends on
DALI's executor and version), so a batch may be kept as long as you like
(``buffers.ReusedBuffers`` recycles only the memory of batches nobody holds any more).
``EvalLoader`` yields every image of its shard exactly once.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from dali_ba.augment import AugmentSpec
from dali_ba.buffers import ReusedBuffers
from dali_ba.config import ConfigError, DataConfig
from dali_ba.dataset import Dataset, scan_image_folder
from dali_ba.errors import DatasetError, DecodeError, StaleLoaderState
from dali_ba.pipeline import (DecodeOptions, abandon_pipeline, build_eval_pipeline, build_train_pipeline,
                              output_names, resolve_device)
from dali_ba.sharding import augment_seed, eval_shard_indices, resolve_shard, steps_per_epoch, train_shard_indices

# The loader state's format. 2 (2026-11-26): every view is its own pipeline output; a DALI
# checkpoint of format 1 names operators (fn.flip, the stack) this graph no longer has.
STATE_FORMAT = 2
LAYOUTS = ("flat", "grouped")
EVAL_SEED_KEY = 1_000_003  # the "epoch" slot of the eval seed: distinct from every train epoch


class _DaliLoader:
    """What both loaders share: the file list, the shard, the recipe and the decode settings."""

    def __init__(self, root, file_list, batch_size, image_size, augment, device, shard_id, num_shards, seed, options):
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected a value >= 1; got {batch_size}")
        self.dataset: Dataset = scan_image_folder(root, file_list)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shard_id, self.num_shards = resolve_shard(shard_id, num_shards)
        self.device = resolve_device(device)
        decode_keys = ("num_threads", "prefetch", "hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint")
        self._decode = DecodeOptions(
            device=self.device,
            device_id=torch.cuda.current_device() if self.device == "cuda" else None,
            **{k: options.pop(k) for k in decode_keys if k in options},
        )
        if "mean" in options:
            options["mean"] = tuple(options["mean"])
        if "std" in options:
            options["std"] = tuple(options["std"])
        self.spec = AugmentSpec(recipe=augment, image_size=int(image_size), **options)
        self._buffers = ReusedBuffers()

    @property
    def classes(self) -> list:
        return list(self.dataset.classes)

    def _to_torch(self, out: dict, num_views: int, grouped: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copy the M view outputs into one batch and give it its layout (channels_last stays a view)."""
        # The copy makes the batch the caller's, whatever DALI does with its own buffers.
        images = self._buffers.stack([out[name] for name in output_names(num_views)[:-1]])
        labels = out["labels"].reshape(-1).to(device=images.device, dtype=torch.long, non_blocking=True)
        if self.spec.channels_last:  # [B, M, H, W, C] → [B, M, C, H, W] with channels-last strides
            images = images.permute(0, 1, 4, 2, 3)
        if grouped:
            return images, labels
        b, m = images.shape[:2]
        return images.flatten(0, 1), labels.repeat_interleave(m)

    def _next(self, iterator, pipe, suspects: Sequence[str]) -> dict:
        """The next DALI output; a failure abandons the dead pipeline and names the file(s) at fault."""
        try:
            return next(iterator)[0]
        except RuntimeError as exc:
            abandon_pipeline(pipe)  # destroying a failed pipeline can crash DALI 2.4
            raise self._decode_error(exc, suspects) from None

    def _decode_error(self, exc: Exception, candidates: Sequence[str]) -> DecodeError:
        """DALI's decode errors rarely name the file: decode the suspects again (bisecting) to find it."""
        from dali_ba.data.verify import find_undecodable

        dali_msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        bad = [(b.path, b.reason) for b in find_undecodable(candidates, num_threads=1, progress=False)]
        hint = f"run `dali-ba data verify {self.dataset.root}` to list every such file (and write a clean file list)"
        if bad:
            named = "; ".join(f"{p} ({r})" for p, r in bad[:10])
            return DecodeError(f"cannot decode {named}; {hint}", bad_files=[p for p, _ in bad])
        return DecodeError(
            f"DALI failed while loading ({dali_msg}); none of the {len(candidates)} files of the batches "
            f"in flight failed a decode on their own; {hint}",
        )


class BatchAugmentLoader(_DaliLoader):
    """B unique images per step per rank, each as M independently augmented views.

    Shards by global rank (``torch.distributed`` when initialised, else rank 0 of 1) unless
    ``shard_id``/``num_shards`` are given. ``len(loader)`` is the steps per epoch of this rank.
    Keyword options: ``file_list``, ``num_threads``, ``prefetch``, ``dtype`` ("float32"/"float16"),
    ``channels_last``, ``min_area``, ``pad``, ``color_jitter``, ``trivial_augment``, ``mean``,
    ``std`` (0..1 scale), ``hw_decoder_load``, ``preallocate_width_hint/height_hint``.

    A file that fails to decode raises ``DecodeError`` naming it; ``state_dict()`` then resumes
    with the batch that failed (replace the file and ``load_state_dict``), and after the file list
    changed, ``set_epoch(epoch, step)`` continues at the same step of the new list's shuffle.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_views: int = 1,
        image_size: int = 224,
        augment: str = "imagenet",
        device: str = "auto",
        shard_id: Optional[int] = None,
        num_shards: Optional[int] = None,
        seed: int = 0,
        layout: str = "flat",
        *,
        file_list: Optional[str] = None,
        **options,
    ):
        if num_views < 1:
            raise ConfigError(f"num_views: expected a value >= 1; got {num_views}")
        if layout not in LAYOUTS:
            raise ConfigError(f"layout: expected one of {', '.join(LAYOUTS)}; got {layout!r}")
        super().__init__(root, file_list, batch_size, image_size, augment, device, shard_id, num_shards, seed, options)
        self.num_views = int(num_views)
        self.layout = layout
        self._steps = steps_per_epoch(len(self.dataset), self.batch_size, self.num_shards)
        if self._steps == 0:
            raise DatasetError(
                f"batch_size={self.batch_size} × {self.num_shards} shard(s) needs at least "
                f"{self.batch_size * self.num_shards} images; {self.dataset.root} has {len(self.dataset)}"
            )
        self._epoch, self._step = 0, 0
        self._dali_state: Optional[bytes] = None  # DALI checkpoint matching (epoch, step)
        self._skip = 0  # batches of this epoch's shuffle left out of its pipeline (set_epoch(e, step))
        self._live = None  # the DALI iterator of the epoch in progress

    @classmethod
    def from_config(cls, data: DataConfig, seed: int = 0, channels_last: bool = False, **overrides) -> "BatchAugmentLoader":
        """Build from the ``data`` section of a Config (shard from torch.distributed)."""
        kwargs = dict(
            root=data.train_root, file_list=data.train_list, batch_size=data.batch_size, num_views=data.num_views,
            image_size=data.image_size, augment=data.augment, device=data.device, seed=seed, **_options(data),
            channels_last=channels_last,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def __len__(self) -> int:
        return self._steps

    @property
    def epoch(self) -> int:
        """The epoch the next ``for`` loop will run (or is running)."""
        return self._epoch

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Start the next ``for`` loop at the beginning of ``epoch`` (like DistributedSampler).

        With ``step`` > 0 the loop starts at that batch of the epoch's shuffle instead, skipping
        the earlier batches without decoding them; the augmentation draws are then fresh, not
        those of an uninterrupted run (use ``load_state_dict`` for a bit-exact resume). This is
        how a run continues after its file list changed (e.g. a broken image was excluded)."""
        if not 0 <= int(step) < self._steps:
            raise ValueError(f"step: expected 0 <= step < {self._steps} (steps per epoch); got {step}")
        self._epoch, self._step, self._dali_state, self._skip = int(epoch), int(step), None, int(step)

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        return train_shard_indices(len(self.dataset), self.batch_size, self.shard_id, self.num_shards, self.seed, epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch, start = self._epoch, self._step
        # After set_epoch(e, step) the pipeline reads the epoch's files from batch `skip` on (its
        # DALI checkpoints count from there too).
        skip = self._skip if start > 0 else 0
        indices = self._epoch_indices(epoch)[skip * self.batch_size:]
        files = [self.dataset.files[i] for i in indices]
        pipe = build_train_pipeline(
            files, self.dataset.labels[indices], batch_size=self.batch_size, num_views=self.num_views,
            spec=self.spec, decode=self._decode, seed=augment_seed(self.seed, self.shard_id, epoch),
            checkpoint=self._dali_state if start > 0 else None,
        )
        self._live = DALIGenericIterator([pipe], output_names(self.num_views), auto_reset=False,
                                         prepare_first_batch=False)
        failed = False
        try:
            for step in range(start, self._steps):
                # The state that resumes with this batch: kept if loading it fails (a dead DALI
                # pipeline cannot be asked afterwards), so the user can fix the file and resume here.
                before = self._live.checkpoints()[0] if step > 0 else None
                # The failing batch is this one or one the pipeline prefetched after it.
                first = (step - skip) * self.batch_size
                suspects = files[first : first + (1 + self._decode.prefetch) * self.batch_size]
                try:
                    out = self._next(self._live, pipe, suspects)
                except DecodeError:
                    failed = True
                    self._dali_state = before
                    raise
                batch = self._to_torch(out, self.num_views, grouped=self.layout == "grouped")
                self._step = step + 1
                yield batch
            self._epoch, self._step, self._dali_state, self._skip = epoch + 1, 0, None, 0
        finally:
            if not failed and self._live is not None and 0 < self._step < self._steps and self._epoch == epoch:
                # Stopped mid-epoch (break, max_steps, exception): keep the state to resume from.
                # At interpreter exit DALI may already be torn down; then there is nothing to keep.
                try:
                    self._dali_state = self._live.checkpoints()[0]
                except (AttributeError, RuntimeError):
                    pass
            self._live = None
            self._buffers.clear()
            del pipe

    def state_dict(self) -> dict:
        """Everything needed to continue with the very next batch (bit for bit on the CPU)."""
        dali_state = self._dali_state
        if self._live is not None and 0 < self._step < self._steps:
            dali_state = self._live.checkpoints()[0]
        return {
            "format": STATE_FORMAT, "epoch": self._epoch, "step": self._step, "dali": dali_state, "skip": self._skip,
            "seed": self.seed, "num_files": len(self.dataset), "batch_size": self.batch_size,
            "num_views": self.num_views, "shard_id": self.shard_id, "num_shards": self.num_shards,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state from another dataset, batch, seed or world size.

        A state saved by a dali-ba version with another DALI graph raises ``StaleLoaderState``
        (its DALI checkpoint cannot be restored); ``set_epoch(epoch, step)`` then continues at the
        same batch in the same order, with fresh augmentation draws.
        """
        mine = self.state_dict()
        keys = ["seed", "num_files", "batch_size", "num_views", "shard_id", "num_shards"]
        differ = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if differ:
            raise ValueError("loader state does not match this loader (" + "; ".join(differ) + ")")
        if state.get("format") != STATE_FORMAT:
            raise StaleLoaderState(f"loader state format {state.get('format')!r} is not {STATE_FORMAT} "
                                   "(saved by another dali-ba version, whose DALI graph differs)")
        # step == steps (a state saved after an epoch's last batch) needs no DALI checkpoint: the next
        # epoch starts afresh.
        if not 0 <= state["step"] <= self._steps or (0 < state["step"] < self._steps and state["dali"] is None):
            raise ValueError(f"loader state has step {state['step']} of {self._steps} without a DALI checkpoint")
        self._epoch, self._step, self._dali_state = int(state["epoch"]), int(state["step"]), state["dali"]
        self._skip = int(state.get("skip", 0))  # absent in states saved before set_epoch(e, step) existed
        if self._step == self._steps:
            self.set_epoch(self._epoch + 1)


class EvalLoader(_DaliLoader):
    """Each image of this shard exactly once, with the eval transform of ``augment``.

    Yields ``[b, C, H, W]`` and ``[b]`` (the last batch may be smaller; shards may differ by one
    batch, so never run a collective per batch). With ``views > 1``: ``[b, views, C, H, W]``
    random train views of each image, for test-time averaging.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        image_size: int = 224,
        augment: str = "imagenet",
        device: str = "auto",
        shard_id: Optional[int] = None,
        num_shards: Optional[int] = None,
        *,
        views: int = 1,
        seed: int = 0,
        file_list: Optional[str] = None,
        **options,
    ):
        if views < 1:
            raise ConfigError(f"views: expected a value >= 1; got {views}")
        super().__init__(root, file_list, batch_size, image_size, augment, device, shard_id, num_shards, seed, options)
        self.views = int(views)
        self.indices = eval_shard_indices(len(self.dataset), self.shard_id, self.num_shards)

    @classmethod
    def from_config(cls, data: DataConfig, batch_size: int = 0, views: int = 1, channels_last: bool = False, seed: int = 0) -> "EvalLoader":
        if data.val_root is None:
            raise ConfigError("data.val_root: not set, so there is nothing to evaluate on")
        return cls(
            data.val_root, batch_size=batch_size or data.batch_size, image_size=data.image_size,
            augment=data.augment, device=data.device, views=views, seed=seed, channels_last=channels_last,
            **_options(data),
        )

    @property
    def num_samples(self) -> int:
        """Images in this shard."""
        return len(self.indices)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self.num_samples == 0:
            return
        files = [self.dataset.files[i] for i in self.indices]
        pipe = build_eval_pipeline(
            files, self.dataset.labels[self.indices], batch_size=self.batch_size, spec=self.spec,
            decode=self._decode, views=self.views, seed=augment_seed(self.seed, self.shard_id, EVAL_SEED_KEY),
        )
        iterator = DALIGenericIterator([pipe], output_names(self.views), auto_reset=False, prepare_first_batch=False)
        try:
            for step in range(len(self)):
                suspects = files[step * self.batch_size : (step + 1 + self._decode.prefetch) * self.batch_size]
                out = self._next(iterator, pipe, suspects)
                valid = min(self.batch_size, self.num_samples - step * self.batch_size)  # drop the padding
                images, labels = self._to_torch(out, self.views, grouped=True)
                images, labels = images[:valid], labels[:valid]
                yield (images[:, 0] if self.views == 1 else images), labels
        finally:
            self._buffers.clear()
            del iterator, pipe


def _options(data: DataConfig) -> dict:
    """Loader keyword options from a DataConfig (everything but the positional basics)."""
    keys = ("num_threads", "prefetch", "dtype", "min_area", "pad", "color_jitter", "trivial_augment", "mean",
            "std", "hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint")
    return {k: getattr(data, k) for k in keys}
