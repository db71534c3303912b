"""Training throughput: the real pipeline versus synthetic tensors already on the device.

    python -m trainers.bench --config pipelines/X.yaml --steps 20 [--json out.json] [key=value ...]
    (or ``dali-ba bench train ...``, which runs this module)

Two phases, alternated for ``--rounds`` rounds, each ``--warmup`` untimed steps then ``--steps``
timed ones, the same model, optimizer and batch shape (B·M views of the config's image size):

- ``real``: batches from ``BatchAugmentLoader.from_config``; the time blocked in ``next(loader)``
  is the *data wait*. ``data-wait fraction = Σ wait / Σ step time`` (step = wait + copy + forward
  + backward + optimizer step, synchronised on a GPU).
- ``synthetic``: one random batch made once on the device; no data loading at all.

``real ÷ synthetic`` throughput near 1 and a small wait fraction: the model is the bottleneck.
A large wait fraction: the run is data-bound (more DALI threads, GPU decoding, or fewer views).
A small wait fraction but ``real ÷ synthetic`` well below 1: the loader keeps up only by taking
CPU from the model (a CPU-only run, where DALI's threads and torch's share the cores);
``compute_slowdown`` (real step time without the wait ÷ synthetic step time) shows how much.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    import torch
    import torch.nn as nn

    from dali_ba.config import load_config
    from dali_ba.errors import UserError
    from dali_ba.loader import BatchAugmentLoader
    from trainers.host_memory import keep_freed_host_memory
    from trainers.loop import AMP_DTYPES
    from trainers.models import build_model
    from trainers.optim import build_optimizer, set_lr

    args = parse_args(argv)
    keep_freed_host_memory()  # as the trainer does, so the benchmark measures the same steps
    try:
        if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
            raise UserError("--steps and --rounds must be >= 1, --warmup >= 0")
        cfg = load_config(args.config, args.overrides)
        loader = BatchAugmentLoader.from_config(cfg.data, seed=cfg.train.seed, channels_last=cfg.train.channels_last)
    except UserError as exc:
        print(f"dali-ba bench train: error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if loader.device == "cuda" else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.num_classes or len(loader.classes)).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    set_lr(optimizer, 1e-3)  # the value does not matter for speed; small so nothing diverges
    loss_fn = nn.CrossEntropyLoss()
    amp = AMP_DTYPES[cfg.train.amp] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    net = torch.compile(model) if cfg.train.compile else model  # compiled in the first warm-up step

    def step(images, labels) -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def batches():
        while True:
            yield from loader

    real_batches = batches()
    b, m, size = cfg.data.batch_size, cfg.data.num_views, cfg.data.image_size
    synthetic = (torch.randn(b * m, 3, size, size, device=device).contiguous(memory_format=memory_format),
                 torch.randint(0, cfg.model.num_classes or len(loader.classes), (b * m,), device=device))
    model.train()

    def run_real(n: int):
        wait = total = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            images, labels = next(real_batches)
            t1 = time.perf_counter()
            step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            _sync(device)
            wait, total = wait + t1 - t0, total + time.perf_counter() - t0
        return wait, total

    def run_synthetic(n: int):
        t0 = time.perf_counter()
        for _ in range(n):
            step(*synthetic)
        _sync(device)
        return 0.0, time.perf_counter() - t0

    rounds: List[dict] = []
    for r in range(args.rounds):
        for phase, fn in (("real", run_real), ("synthetic", run_synthetic)):
            fn(args.warmup)
            wait, total = fn(args.steps)
            row = {"round": r, "phase": phase, "steps": args.steps, "seconds": total, "data_wait_s": wait,
                   "steps_per_s": args.steps / total, "images_per_s": args.steps * b / total,
                   "samples_per_s": args.steps * b * m / total}
            rounds.append(row)
            print(f"round {r + 1}/{args.rounds} {phase:<9}: {row['steps_per_s']:.2f} steps/s, "
                  f"{row['images_per_s']:.1f} img/s, {row['samples_per_s']:.1f} samples/s"
                  + (f", data wait {wait / total:.0%}" if phase == "real" else ""), file=sys.stderr, flush=True)
    real = [x for x in rounds if x["phase"] == "real"]
    syn = [x for x in rounds if x["phase"] == "synthetic"]
    real_ips = sum(x["steps"] * b for x in real) / sum(x["seconds"] for x in real)
    syn_ips = sum(x["steps"] * b for x in syn) / sum(x["seconds"] for x in syn)
    wait_fraction = sum(x["data_wait_s"] for x in real) / sum(x["seconds"] for x in real)
    compute_per_step = sum(x["seconds"] - x["data_wait_s"] for x in real) / sum(x["steps"] for x in real)
    synthetic_per_step = sum(x["seconds"] for x in syn) / sum(x["steps"] for x in syn)
    if wait_fraction > 0.1:
        verdict = "data-bound: the loader cannot keep up"
    elif real_ips / syn_ips < 0.8:
        verdict = "the loader keeps up but takes compute from the model (shared CPU cores)"
    else:
        verdict = "model-bound"
    summary = {
        "real_images_per_s": real_ips, "real_samples_per_s": real_ips * m,
        "synthetic_images_per_s": syn_ips, "synthetic_samples_per_s": syn_ips * m,
        "real_vs_synthetic": real_ips / syn_ips, "data_wait_fraction": wait_fraction,
        "compute_slowdown": compute_per_step / synthetic_per_step,
        "data_bound": wait_fraction > 0.1, "verdict": verdict, "compiled": cfg.train.compile,
    }
    print(f"| phase | images/s | samples/s (×M={m}) |\n|---|---:|---:|\n"
          f"| real pipeline | {real_ips:.1f} | {real_ips * m:.1f} |\n"
          f"| synthetic on {device.type} | {syn_ips:.1f} | {syn_ips * m:.1f} |\n\n"
          f"real ÷ synthetic: {summary['real_vs_synthetic']:.2f}; data-wait fraction: {wait_fraction:.1%}; "
          f"compute slowdown {summary['compute_slowdown']:.2f}× ({verdict}); model {cfg.model.arch}, "
          f"B={b}, M={m}, {size}px, device {device.type}, DALI threads {cfg.data.num_threads}")
    if args.json:
        from dataclasses import asdict

        from dali_ba.bench import machine_info, versions

        record = {"kind": "train", "command": " ".join(["dali-ba bench train"] + sys.argv[1:]),
                  "machine": machine_info(device.type), "versions": versions(), "config": asdict(cfg),
                  "summary": summary, "rounds": rounds}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
