"""Small GPU measurements for ``gpu_check``, each run in its own process, printing one JSON line.

- ``info``: the card, the driver, torch's and DALI's CUDA builds, nvImageCodec, NPP and cuFFT as
  DALI finds them (``-1``: not found; this graph needs neither).
- ``memory``: one ImageNet-recipe loader (B=64, M=4) on a subset: time to the first batch (the
  pipeline build, nvJPEG and the hardware decoder's start, the decoder's preallocation), then
  device memory in use (``mem_get_info``: DALI's pools are not in torch's allocator) and RSS
  after each of five epochs, an evaluation, and one more epoch. ``--hints on`` uses the recipe's
  ``preallocate_*_hint`` (ImageNet's largest image), ``off`` none.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.processes import rss_bytes

HINTS = {"off": (0, 0), "on": (5980, 6430)}
GROWTH_LIMIT_MIB = 128  # after the first epoch; DALI's pools should have stopped growing by then


def driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - any NVML failure just means "unknown"
        return None


def info() -> dict:
    import torch

    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "driver": driver_version(),
           "visible_gpus": torch.cuda.device_count(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    props = torch.cuda.get_device_properties(0)
    out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
               memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    import nvidia.dali as dali
    from nvidia.dali import backend

    out.update(dali=dali.__version__, dali_cuda=str(getattr(dali, "__cuda_version__", "")),
               dali_cuda_runtime_seen=backend.GetCudaVersion(), nvimgcodec=backend.GetNvimgcodecVersion(),
               npp=backend.GetNppVersion(), cufft=backend.GetCufftVersion())
    return out


def _used() -> tuple:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20, rss_bytes() / 2**20


def memory(root: str, val_root: str, hints: str, threads: int, images: int = 640, epochs: int = 5) -> dict:
    import torch

    from dali_ba import BatchAugmentLoader, EvalLoader
    from dali_ba.dataset import scan_image_folder

    dataset = scan_image_folder(root)
    step = max(1, len(dataset) // images)
    listing = Path(tempfile.mkdtemp(prefix="gpu-probe-")) / "subset.txt"
    listing.write_text("".join(f"{Path(f).relative_to(Path(root).resolve())} {int(y)}\n"
                               for f, y in list(zip(dataset.files, dataset.labels))[::step][:images]))
    width, height = HINTS[hints]
    torch.cuda.init()
    base_device, base_rss = _used()
    common = dict(image_size=224, augment="imagenet", device="cuda", num_threads=threads,
                  preallocate_width_hint=width, preallocate_height_hint=height)
    t0 = time.perf_counter()
    train = BatchAugmentLoader(root, file_list=str(listing), batch_size=64, num_views=4, **common)
    batches = iter(train)
    first = next(batches)
    torch.cuda.synchronize()
    first_batch_s = time.perf_counter() - t0
    del first
    for _ in batches:
        pass
    device, rss = [], []
    for epoch in range(epochs + 1):
        if epoch == epochs:  # an evaluation, then one more epoch
            val = EvalLoader(val_root, batch_size=64, classes=train.classes, **common)
            for _ in val:
                pass
        if epoch > 0:
            for _ in train:
                pass
        d, r = _used()
        device.append(round(d, 1))
        rss.append(round(r, 1))
    growth = device[-1] - device[0]
    return {"hints": hints, "first_batch_s": round(first_batch_s, 2), "baseline_device_mib": round(base_device, 1),
            "baseline_rss_mib": round(base_rss, 1), "device_used_mib": device, "rss_mib": rss,
            "device_growth_mib": round(growth, 1), "rss_growth_mib": round(rss[-1] - rss[0], 1),
            "flat": growth <= GROWTH_LIMIT_MIB, "pipeline_builds": [train.pipeline_builds, val.pipeline_builds],
            "images": len(train.dataset), "epochs": epochs + 1}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("info")
    mem = sub.add_parser("memory")
    mem.add_argument("--root", required=True)
    mem.add_argument("--val-root", required=True)
    mem.add_argument("--hints", choices=sorted(HINTS), default="off")
    mem.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    result = info() if args.what == "info" else memory(args.root, args.val_root, args.hints, args.threads)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
