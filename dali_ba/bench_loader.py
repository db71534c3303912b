"""Loader throughput, side by side: our fused DALI pipeline against what users would otherwise write.

Variants (all produce the same thing: ``B·M`` float32 ``[3, S, S]`` ImageNet-normalised views
of random-resized crops (area 0.08–1, aspect 3/4–4/3) + horizontal flips, labels repeated M×):

- ``dali-fused``: ``BatchAugmentLoader`` itself: each image decoded once, M view branches.
- ``dali-naive``: the same DALI graph but every view decodes the image again with its own
  decoder (named + ``preserve=True``, so DALI's common-subexpression elimination cannot merge
  the M decoders back into one) — what you get writing M ordinary DALI pipelines' worth of work.
- ``dali-fused-noaa`` (not in the default set): ``dali-fused`` with ``antialias=False``, the
  explicit faster approximation (aliased downscaling): shows what the antialiasing filter costs.
- ``torchvision``: ``ImageFolder`` (PIL decode, EXIF orientation applied) + the torchvision v2
  transform applied M times to the decoded image and stacked, in a ``DataLoader`` with
  ``num_workers=T`` persistent workers (``torch.set_num_threads(1)`` in each; ``pin_memory`` on GPU).

Method: every (variant, M) is measured once per round; rounds interleave the variants (A, B, C,
A, B, C, … with the order rotated each round) so a noisy neighbour hits all of them alike. A
measurement builds the loader, discards ``warmup`` batches, times ``batches`` batches (wall clock
and CPU seconds of this process *and* its children, e.g. DataLoader workers, read from /proc),
then tears the loader down so nothing keeps prefetching during the next measurement. Reported:
medians over rounds, with min/max.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

VARIANTS = ("dali-fused", "dali-naive", "torchvision")  # the default set
DALI_VARIANTS = ("dali-fused", "dali-naive", "dali-fused-noaa")
ALL_VARIANTS = VARIANTS + ("dali-fused-noaa",)  # + ours with antialias=False (an explicit approximation)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class LoaderBenchSettings:
    root: str
    views: Sequence[int] = (1, 2, 4, 8)
    variants: Sequence[str] = VARIANTS
    batch_size: int = 64
    threads: int = 2
    repeats: int = 3
    batches: int = 12
    warmup: int = 3
    min_seconds: float = 0.0  # keep timing past ``batches`` until the window lasts this long
    image_size: int = 224
    device: str = "cpu"  # "cpu" or "cuda" (DALI: decode "mixed"; torchvision: pinned copy to GPU)
    hw_decoder_loads: Sequence[float] = (0.65,)  # GPU only: one DALI measurement per value
    prefetch: int = 2
    seed: int = 0
    options: Dict[str, object] = field(default_factory=dict)  # extra BatchAugmentLoader keywords


# ---------------------------------------------------------------- CPU time of the process tree

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> Optional[Tuple[int, float]]:
    """(parent pid, utime + stime in seconds) of a live process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def _descendants_cpu(root_pid: int) -> float:
    """CPU seconds of the live descendants of ``root_pid`` (children, grandchildren, …)."""
    parents: Dict[int, List[Tuple[int, float]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _proc_stat(int(name))
            if info is not None:
                parents.setdefault(info[0], []).append((int(name), info[1]))
    total, todo = 0.0, [root_pid]
    while todo:
        for pid, cpu in parents.get(todo.pop(), []):
            total += cpu
            todo.append(pid)
    return total


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads), its live descendants, and the
    children it already reaped. Take the difference over a window."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    gone = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = _descendants_cpu(os.getpid()) if os.path.isdir("/proc") else 0.0
    return me.ru_utime + me.ru_stime + gone.ru_utime + gone.ru_stime + live


# ---------------------------------------------------------------- the variants

class _Source:
    """A started loader: ``next_batch()`` → (images [B·M, 3, S, S], labels [B·M]); ``close()``."""

    def __init__(self, batches: Iterator, close: Callable[[], None]):
        self._batches, self._close = batches, close

    def next_batch(self):
        return next(self._batches)

    def close(self) -> None:
        self._close()


def _dali_loader(s: LoaderBenchSettings, num_views: int, hw_decoder_load: float, **options):
    from dali_ba.loader import BatchAugmentLoader

    return BatchAugmentLoader(
        s.root, batch_size=s.batch_size, num_views=num_views, image_size=s.image_size, augment="imagenet",
        device=s.device, shard_id=0, num_shards=1, seed=s.seed, num_threads=s.threads, prefetch=s.prefetch,
        hw_decoder_load=hw_decoder_load, mean=MEAN, std=STD, **{**s.options, **options},
    )


def _fused_batches(loader) -> Iterator:
    while True:  # epoch after epoch, exactly as a training loop would use it
        yield from loader


def _naive_batches(loader) -> Iterator:
    """The loader's own epoch loop, with the naive graph (one decoder per view)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from dali_ba.pipeline import build_train_pipeline, output_names
    from dali_ba.sharding import augment_seed

    epoch = 0
    while True:
        indices = loader._epoch_indices(epoch)
        pipe = build_train_pipeline(
            [loader.dataset.files[i] for i in indices], loader.dataset.labels[indices],
            batch_size=loader.batch_size, num_views=loader.num_views, spec=loader.spec,
            decode=loader._decode, seed=augment_seed(loader.seed, 0, epoch), decode_per_view=True,
        )
        iterator = DALIGenericIterator([pipe], output_names(loader.num_views), auto_reset=False,
                                       prepare_first_batch=False)
        for _ in range(len(loader)):
            yield loader._to_torch(next(iterator)[0], loader.num_views, grouped=False)
        del iterator, pipe
        epoch += 1


def _start_dali(s: LoaderBenchSettings, variant: str, num_views: int, hw_decoder_load: float) -> _Source:
    loader = _dali_loader(s, num_views, hw_decoder_load, **({"antialias": False} if variant.endswith("-noaa") else {}))
    batches = _naive_batches(loader) if variant == "dali-naive" else _fused_batches(loader)
    return _Source(batches, batches.close)  # closing the generator releases the DALI pipeline


class MultiView:
    """``transform`` applied ``num_views`` times to one decoded image, stacked: [M, C, H, W]."""

    def __init__(self, transform, num_views: int):
        self.transform, self.num_views = transform, num_views

    def __call__(self, image):
        import torch

        return torch.stack([self.transform(image) for _ in range(self.num_views)])


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


def _start_torchvision(s: LoaderBenchSettings, num_views: int) -> _Source:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(s.root, transform=MultiView(torchvision_transform(s.image_size), num_views),
                          loader=pil_loader_exif)
    cuda = s.device == "cuda"
    loader = DataLoader(
        dataset, batch_size=s.batch_size, shuffle=True, drop_last=True, num_workers=s.threads,
        persistent_workers=s.threads > 0, pin_memory=cuda, worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(s.seed),
    )
    state = {"it": None}

    def batches():
        while True:
            state["it"] = iter(loader)  # persistent workers: the same processes every epoch
            for images, labels in state["it"]:
                if cuda:
                    images = images.cuda(non_blocking=True)
                    labels = labels.cuda(non_blocking=True)
                yield images.flatten(0, 1), labels.repeat_interleave(num_views)

    def close():
        it = state["it"]
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # stop the workers now: no prefetching into the next measurement

    return _Source(batches(), close)


# ---------------------------------------------------------------- measuring

@dataclass
class Case:
    variant: str
    num_views: int
    hw_decoder_load: Optional[float] = None  # GPU DALI cases only

    @property
    def key(self) -> Tuple:
        return (self.variant, self.num_views, self.hw_decoder_load)


def cases(s: LoaderBenchSettings) -> List[Case]:
    out = []
    for m in s.views:
        for v in s.variants:
            if v in DALI_VARIANTS and s.device == "cuda":
                out.extend(Case(v, m, hw) for hw in s.hw_decoder_loads)
            else:
                out.append(Case(v, m))
    return out


def start(s: LoaderBenchSettings, case: Case) -> _Source:
    if case.variant in DALI_VARIANTS:
        hw = case.hw_decoder_load if case.hw_decoder_load is not None else 0.65
        return _start_dali(s, case.variant, case.num_views, hw)
    if case.variant == "torchvision":
        return _start_torchvision(s, case.num_views)
    raise ValueError(f"unknown variant {case.variant!r}; expected one of {', '.join(ALL_VARIANTS)}")


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(s: LoaderBenchSettings, case: Case) -> dict:
    """One timed window: ``batches`` batches after ``warmup``; the loader is torn down after."""
    source = start(s, case)
    try:
        for _ in range(s.warmup):
            source.next_batch()
        _sync(s.device)
        cpu0, t0 = process_tree_cpu_seconds(), time.perf_counter()
        done = 0
        while done < s.batches or time.perf_counter() - t0 < s.min_seconds:
            images, labels = source.next_batch()
            done += 1
        _sync(s.device)
        wall, cpu = time.perf_counter() - t0, process_tree_cpu_seconds() - cpu0
    finally:
        source.close()
    expected = (s.batch_size * case.num_views, 3, s.image_size, s.image_size)
    if tuple(images.shape) != expected or len(labels) != expected[0]:
        raise RuntimeError(f"{case.variant}: batch shape {tuple(images.shape)}, expected {expected}")
    n = s.batch_size * done
    return {"wall_s": wall, "cpu_s": cpu, "images": n, "images_per_s": n / wall, "cpu_s_per_image": cpu / n,
            "load_1min": round(os.getloadavg()[0], 2)}  # how busy the machine was (other processes too)


def _median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def summarise(case: Case, repeats: List[dict]) -> dict:
    ips = [r["images_per_s"] for r in repeats]
    cpi = [r["cpu_s_per_image"] for r in repeats]
    out = {
        "variant": case.variant,
        "num_views": case.num_views,
        "images_per_s": _median(ips),
        "views_per_s": _median(ips) * case.num_views,
        "cpu_s_per_image": _median(cpi),
        "images_per_s_min": min(ips),
        "images_per_s_max": max(ips),
        "cpu_s_per_image_min": min(cpi),
        "cpu_s_per_image_max": max(cpi),
        "repeats": repeats,
    }
    if case.hw_decoder_load is not None:
        out["hw_decoder_load"] = case.hw_decoder_load
    return out


def run_rounds(s: LoaderBenchSettings, log: Callable[[str], None] = print) -> List[dict]:
    """All cases, ``repeats`` interleaved rounds (order rotated each round); summaries in case order."""
    todo = cases(s)
    done: Dict[Tuple, List[dict]] = {c.key: [] for c in todo}
    for r in range(s.repeats):
        shift = r % len(todo)
        for case in todo[shift:] + todo[:shift]:
            result = measure(s, case)
            result["round"] = r
            done[case.key].append(result)
            hw = f" hw_decoder_load={case.hw_decoder_load}" if case.hw_decoder_load is not None else ""
            log(f"round {r + 1}/{s.repeats}  {case.variant:<12} M={case.num_views}{hw}: "
                f"{result['images_per_s']:8.1f} img/s  {result['cpu_s_per_image'] * 1e3:6.2f} CPU ms/img")
    return [summarise(c, done[c.key]) for c in todo]


def _paired(fused: dict, other: dict, key: str, invert: bool = False) -> Optional[float]:
    """Median over rounds of the same-round ratio (both measured minutes apart at most, so a
    slowly changing background load cancels better than in a ratio of medians)."""
    theirs = {r["round"]: r[key] for r in other["repeats"] if "round" in r}
    pairs = [(theirs[r["round"]] / r[key]) if invert else (r[key] / theirs[r["round"]])
             for r in fused["repeats"] if r.get("round") in theirs]
    return _median(pairs) if pairs else None


def ratios(results: List[dict]) -> Dict[str, Dict[str, float]]:
    """Per M: fused vs torchvision / naive (img/s and CPU-s per image), and fused views/s vs M=1.

    ``X_vs_Y``: ratio of the medians; ``X_vs_Y_paired``: median of the per-round ratios.
    """
    hw = next((r["hw_decoder_load"] for r in results if "hw_decoder_load" in r), None)  # first of a sweep
    by = {(r["variant"], r["num_views"]): r for r in results if r.get("hw_decoder_load") in (None, hw)}
    out: Dict[str, Dict[str, float]] = {}
    fused1 = by.get(("dali-fused", 1))
    for (variant, m), fused in sorted(by.items(), key=lambda kv: kv[0][1]):
        if variant != "dali-fused":
            continue
        row: Dict[str, float] = {}
        for other in ("torchvision", "dali-naive"):
            if (other, m) in by:
                o = by[(other, m)]
                row[f"images_per_s_vs_{other}"] = fused["images_per_s"] / o["images_per_s"]
                row[f"cpu_per_image_vs_{other}"] = o["cpu_s_per_image"] / fused["cpu_s_per_image"]
                row[f"images_per_s_vs_{other}_paired"] = _paired(fused, o, "images_per_s")
                row[f"cpu_per_image_vs_{other}_paired"] = _paired(fused, o, "cpu_s_per_image", invert=True)
        if fused1 is not None:
            row["views_per_s_vs_m1"] = fused["views_per_s"] / fused1["views_per_s"]
            paired = _paired(fused, fused1, "images_per_s")
            row["views_per_s_vs_m1_paired"] = paired * m if paired is not None else None
        out[f"M={m}"] = {k: v for k, v in row.items() if v is not None}
    return out
