"""Loader throughput, side by side: our fused DALI pipeline against what users would otherwise write.

Every variant produces the same thing: ``B·M`` float32 ``[3, S, S]`` ImageNet-normalised views of
random-resized crops (area 0.08–1, aspect 3/4–4/3) + horizontal flips, labels repeated M×
(``tests/test_bench.py`` checks it on real JPEGs). Variants (``variants.py`` builds them):

- ``dali-fused``: ``BatchAugmentLoader``: each image decoded once, M view branches, one pipeline
  for the whole run, reset at each epoch's end.
- ``dali-rebuild``: the same loader built anew every epoch (a pipeline per epoch), to show what
  building once saves at epoch boundaries.
- ``dali-naive``: ``decode_per_view="full"``: every view decodes the whole image again.
- ``dali-naive-crop``: ``decode_per_view="crop"``: every view decodes only its random crop
  (``decoders.image_random_crop``), what a DALI user would write without fusing.
- ``dali-rn50`` (M=1 only): DALI's own ResNet-50 training pipeline (its PyTorch example's graph),
  the reference users know for one view per image.
- ``dali-fused-noaa``: ``dali-fused`` with ``antialias=False`` (an explicit approximation).
- ``dali-packed``, ``dali-packed-s3``: ``dali-fused`` reading the same images packed
  (``dali-ba data pack``) from a local folder or an ``s3://`` URL (``--packed``, ``--packed-s3``).
- ``dali-fused-<option>``: ``dali-fused`` with one per-view option on, at the recipes' setting
  (``option_variants``): ``cutout`` (one hole of half the image side, the paper's 16/32),
  ``erase`` (``random_erase=0.25``), ``randaug`` (``rand_augment=[2, 9]``), ``autoaug``
  (``auto_augment``), ``trivial`` (``trivial_augment``): what each option costs, against
  ``dali-fused`` measured in the same rounds. They no longer produce the plain output.
- ``torchvision``: ``ImageFolder`` (PIL decode, EXIF orientation applied) + the torchvision v2
  transform applied M times to the decoded image, in a ``DataLoader`` with ``T`` workers.

Method: every case (variant, M, hw_decoder_load) is measured once per round; rounds interleave the
cases (order rotated each round) so a noisy neighbour hits all of them alike. A measurement builds
the loader, discards ``warmup`` batches, times at least ``batches`` batches and ``min_seconds``
(wall clock, with a device sync on the GPU, and CPU seconds of the process tree), then tears it
down. Per-batch times give the epoch-boundary cost: the median first batch of an epoch minus the
median of the other batches. Reported: medians over rounds, with min/max, and ratios.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks.processes import descendants_cpu_seconds

VARIANTS = ("dali-fused", "dali-naive", "torchvision")  # the default set


def option_variants(image_size: int) -> Dict[str, Dict[str, object]]:
    """``dali-fused`` with one per-view option on: variant name → BatchAugmentLoader keywords."""
    return {"dali-fused-cutout": {"cutout": image_size // 2}, "dali-fused-erase": {"random_erase": 0.25},
            "dali-fused-randaug": {"rand_augment": (2, 9)}, "dali-fused-autoaug": {"auto_augment": True},
            "dali-fused-trivial": {"trivial_augment": True}}


OPTION_VARIANTS = tuple(option_variants(224))
DALI_VARIANTS = ("dali-fused", "dali-rebuild", "dali-naive", "dali-naive-crop", "dali-fused-noaa", "dali-rn50",
                 "dali-packed", "dali-packed-s3") + OPTION_VARIANTS
ALL_VARIANTS = DALI_VARIANTS + ("torchvision",)
SINGLE_VIEW_VARIANTS = ("dali-rn50",)


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
    epoch_images: int = 0  # > 0: read only this many images, so epochs are short and boundaries show
    packed: Optional[str] = None  # dali-packed: the same images packed (dali-ba data pack), a local folder
    packed_s3: Optional[str] = None  # dali-packed-s3: the same, at an s3:// URL
    file_list: Optional[str] = None  # set by ``prepare``: the subset's file list
    options: Dict[str, object] = field(default_factory=dict)  # extra BatchAugmentLoader keywords


# ---------------------------------------------------------------- CPU time of the process tree

def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads), its live descendants, and the
    children it already reaped. Take the difference over a window."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    gone = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = descendants_cpu_seconds(os.getpid())
    return me.ru_utime + me.ru_stime + gone.ru_utime + gone.ru_stime + live


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
            if v in SINGLE_VIEW_VARIANTS and m != 1:
                continue
            if v in DALI_VARIANTS and s.device == "cuda":
                out.extend(Case(v, m, hw) for hw in s.hw_decoder_loads)
            else:
                out.append(Case(v, m))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(s: LoaderBenchSettings, case: Case) -> dict:
    """One timed window: ``batches`` batches (and ``min_seconds``) after ``warmup``; torn down after."""
    from benchmarks.variants import start

    source = start(s, case)
    try:
        for _ in range(s.warmup):
            source.next_batch()
        _sync(s.device)
        first = source.position
        cpu0 = process_tree_cpu_seconds()
        t0 = t_prev = time.perf_counter()
        times: List[Tuple[int, float]] = []  # (position in the epoch, seconds)
        while len(times) < s.batches or time.perf_counter() - t0 < s.min_seconds:
            position = source.position
            images, labels = source.next_batch()
            _sync(s.device)
            now = time.perf_counter()
            times.append((position, now - t_prev))
            t_prev = now
        wall, cpu = time.perf_counter() - t0, process_tree_cpu_seconds() - cpu0
    finally:
        source.close()
    expected = (s.batch_size * case.num_views, 3, s.image_size, s.image_size)
    if tuple(images.shape) != expected or len(labels) != expected[0]:
        raise RuntimeError(f"{case.variant}: batch shape {tuple(images.shape)}, expected {expected}")
    n = s.batch_size * len(times)
    starts = [t for p, t in times if p == 0]
    others = [t for p, t in times if p != 0]
    return {"wall_s": wall, "cpu_s": cpu, "images": n, "images_per_s": n / wall, "cpu_s_per_image": cpu / n,
            "first_position": first, "epoch_starts": len(starts),
            "epoch_start_batch_s": _median(starts) if starts else None,
            "other_batch_s": _median(others) if others else None,
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
    starts = [r["epoch_start_batch_s"] for r in repeats if r["epoch_start_batch_s"] is not None]
    others = [r["other_batch_s"] for r in repeats if r["other_batch_s"] is not None]
    if starts and others:  # how much longer the first batch of an epoch takes than the others
        out["epoch_boundary_s"] = _median(starts) - _median(others)
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
            log(f"round {r + 1}/{s.repeats}  {case.variant:<15} M={case.num_views}{hw}: "
                f"{result['images_per_s']:8.1f} img/s  {result['cpu_s_per_image'] * 1e3:6.2f} CPU ms/img")
    return [summarise(c, done[c.key]) for c in todo]


def _paired(fused: dict, other: dict, key: str, invert: bool = False) -> Optional[float]:
    """Median over rounds of the same-round ratio (both measured minutes apart at most, so a
    slowly changing background load cancels better than in a ratio of medians)."""
    theirs = {r["round"]: r[key] for r in other["repeats"] if "round" in r}
    pairs = [(theirs[r["round"]] / r[key]) if invert else (r[key] / theirs[r["round"]])
             for r in fused["repeats"] if r.get("round") in theirs]
    return _median(pairs) if pairs else None


COMPARED = ("torchvision", "dali-naive", "dali-naive-crop", "dali-rebuild", "dali-rn50", "dali-packed",
            "dali-packed-s3") + OPTION_VARIANTS


def ratios(results: List[dict]) -> Dict[str, Dict[str, float]]:
    """Per M: fused vs each other variant (img/s and CPU-s per image), and fused views/s vs M=1.

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
        for other in COMPARED:
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
