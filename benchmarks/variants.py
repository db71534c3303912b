"""The loaders ``loader_bench`` compares (see its docstring), each started as a ``Source``.

A ``Source`` hands out batches ``(images [B·M, 3, S, S], labels [B·M])`` epoch after epoch and
knows the position in the epoch of the batch it hands out next (for the epoch-boundary cost).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import numpy as np

from benchmarks.loader_bench import Case, LoaderBenchSettings, option_variants
from dali_ba.options import IMAGENET_MEAN as MEAN
from dali_ba.options import IMAGENET_STD as STD


class Source:
    """A started loader: ``next_batch()``, ``position`` (of the next batch in its epoch), ``close()``."""

    def __init__(self, batches: Iterator, position: Callable[[], int], close: Callable[[], None]):
        self._batches, self._position, self._close = batches, position, close

    @property
    def position(self) -> int:
        return self._position()

    def next_batch(self):
        return next(self._batches)

    def close(self) -> None:
        self._close()


def samples(s: LoaderBenchSettings) -> List[Tuple[str, int]]:
    """(path, label) of the images every variant reads: the dataset, or ``epoch_images`` of them."""
    from dali_ba.dataset import scan_image_folder

    dataset = scan_image_folder(s.root, s.file_list)
    pairs = list(zip(dataset.files, (int(x) for x in dataset.labels)))
    if s.epoch_images and s.epoch_images < len(pairs):
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, s.epoch_images).round().astype(int)]
    return pairs


def prepare(s: LoaderBenchSettings) -> None:
    """With ``epoch_images``: write the subset as a file list (kept for the process's lifetime)."""
    if not s.epoch_images or s.file_list is not None:
        return
    root = Path(s.root).resolve()
    listing = tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="bench-subset-", delete=False)
    with listing:
        for path, label in samples(s):
            listing.write(f"{Path(path).relative_to(root)} {label}\n")
    s.file_list = listing.name


def _dali_loader(s: LoaderBenchSettings, num_views: int, hw_decoder_load: float, root=None, **options):
    from dali_ba.loader import BatchAugmentLoader

    return BatchAugmentLoader(
        root or s.root, file_list=None if root else s.file_list, batch_size=s.batch_size, num_views=num_views,
        image_size=s.image_size, augment="imagenet", device=s.device, shard_id=0, num_shards=1, seed=s.seed,
        num_threads=s.threads, prefetch=s.prefetch, hw_decoder_load=hw_decoder_load, mean=MEAN, std=STD,
        **{**s.options, **options},
    )


def _endless(loader) -> Iterator:
    while True:  # epoch after epoch, exactly as a training loop would use it
        yield from loader


def _start_loader(s: LoaderBenchSettings, case: Case, hw: float) -> Source:
    options = {"dali-naive": {"decode_per_view": "full"}, "dali-naive-crop": {"decode_per_view": "crop"},
               "dali-fused-noaa": {"antialias": False}, "dali-packed": {"root": s.packed},
               "dali-packed-s3": {"root": s.packed_s3}, **option_variants(s.image_size)}.get(case.variant, {})
    loader = _dali_loader(s, case.num_views, hw, **options)
    batches = _endless(loader)
    return Source(batches, lambda: loader.step % len(loader), batches.close)


def _start_rebuild(s: LoaderBenchSettings, case: Case, hw: float) -> Source:
    """A new loader (so a new pipeline) every epoch."""
    current = {}

    def batches():
        epoch = 0
        while True:
            current["loader"] = loader = _dali_loader(s, case.num_views, hw)
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    gen = batches()
    return Source(gen, lambda: current["loader"].step % len(current["loader"]) if current else 0, gen.close)


def _start_rn50(s: LoaderBenchSettings, hw: float) -> Source:
    """DALI's ResNet-50 PyTorch example's training graph (one view per image), on our files."""
    import torch
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from dali_ba.pipeline import DEVICE_MEMORY_PADDING, HOST_MEMORY_PADDING

    pairs = samples(s)
    cuda = s.device == "cuda"

    @pipeline_def(batch_size=s.batch_size, num_threads=s.threads, device_id=0 if cuda else None, seed=s.seed,
                  prefetch_queue_depth=s.prefetch)
    def rn50():
        jpegs, labels = fn.readers.file(files=[p for p, _ in pairs], labels=[c for _, c in pairs], random_shuffle=True,
                                        pad_last_batch=True, name="Reader")
        crop = dict(random_aspect_ratio=[0.75, 4.0 / 3.0], random_area=[0.08, 1.0], num_attempts=100)
        if cuda:
            images = fn.decoders.image_random_crop(jpegs, device="mixed", output_type=types.RGB,
                                                   device_memory_padding=DEVICE_MEMORY_PADDING,
                                                   host_memory_padding=HOST_MEMORY_PADDING, hw_decoder_load=hw, **crop)
        else:
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, **crop)
        images = fn.resize(images, resize_x=s.image_size, resize_y=s.image_size, interp_type=types.INTERP_TRIANGULAR)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          crop=(s.image_size, s.image_size), mean=[m * 255 for m in MEAN],
                                          std=[x * 255 for x in STD], mirror=fn.random.coin_flip(probability=0.5))
        return images, labels.gpu() if cuda else labels

    pipe = rn50()
    pipe.build()
    iterator = DALIGenericIterator([pipe], ["data", "label"], reader_name="Reader", auto_reset=True,
                                   last_batch_policy=LastBatchPolicy.DROP)
    steps, count = len(pairs) // s.batch_size, [0]

    def batches():
        while True:
            for out in iterator:
                count[0] += 1
                # DALI's example hands out its buffers; a copy, as our loader makes, keeps it comparable
                yield out[0]["data"].clone(), out[0]["label"].reshape(-1).to(torch.long)

    gen = batches()
    return Source(gen, lambda: count[0] % steps, gen.close)


class _MultiView:
    """``transform`` applied ``num_views`` times to one decoded image, stacked: [M, C, H, W]."""

    def __init__(self, transform, num_views: int):
        self.transform, self.num_views = transform, num_views

    def __call__(self, image):
        import torch

        return torch.stack([self.transform(image) for _ in range(self.num_views)])


class _Files:
    """A map-style dataset over (path, label) pairs: the same images the DALI variants read."""

    def __init__(self, pairs, transform):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        path, label = self.pairs[i]
        return self.transform(pil_loader_exif(path)), label


def torchvision_transform(image_size: int):
    """The usual (and fastest honest) torchvision train transform on a PIL image."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def pil_loader_exif(path: str):
    """torchvision's ``pil_loader`` plus EXIF orientation, which DALI's decoder applies too."""
    from PIL import Image, ImageOps

    with open(path, "rb") as f:
        image = Image.open(f).convert("RGB")
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)


def _start_torchvision(s: LoaderBenchSettings, num_views: int) -> Source:
    import torch
    from torch.utils.data import DataLoader

    dataset = _Files(samples(s), _MultiView(torchvision_transform(s.image_size), num_views))
    cuda = s.device == "cuda"
    loader = DataLoader(
        dataset, batch_size=s.batch_size, shuffle=True, drop_last=True, num_workers=s.threads,
        persistent_workers=s.threads > 0, pin_memory=cuda, worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(s.seed),
    )
    state = {"it": None, "count": 0}

    def batches():
        while True:
            state["it"] = iter(loader)  # persistent workers: the same processes every epoch
            for images, labels in state["it"]:
                state["count"] += 1
                if cuda:
                    images = images.cuda(non_blocking=True)
                    labels = labels.cuda(non_blocking=True)
                yield images.flatten(0, 1), labels.repeat_interleave(num_views)

    def close():
        it = state["it"]
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # stop the workers now: no prefetching into the next measurement

    return Source(batches(), lambda: state["count"] % len(loader), close)


def start(s: LoaderBenchSettings, case: Case) -> Source:
    hw = case.hw_decoder_load if case.hw_decoder_load is not None else 0.65
    if case.variant == "torchvision":
        return _start_torchvision(s, case.num_views)
    if case.variant == "dali-rn50":
        return _start_rn50(s, hw)
    if case.variant == "dali-rebuild":
        return _start_rebuild(s, case, hw)
    return _start_loader(s, case, hw)
