"""Training throughput: the trainer's own step fed by the real pipeline versus synthetic tensors.

Two phases, alternated for ``rounds`` rounds, each ``warmup`` untimed steps then at least ``steps``
timed ones and ``min_seconds``: the same ``trainers.engine`` step (the trainer's: view chunks,
label smoothing, AMP, channels-last, compile, diagnostics), the same batch shape, the same device
synchronisation after every step on both sides.

- ``real``: batches from ``BatchAugmentLoader.from_config``; the time blocked in ``next(loader)``
  is the *data wait*; ``data-wait fraction = Σ wait / Σ step time``.
- ``synthetic``: one random batch made once on the device; no data loading at all.

``real ÷ synthetic`` near 1 and a small wait fraction: the model is the bottleneck. A large wait
fraction: the run is data-bound (more DALI threads, GPU decoding, or fewer views). A small wait
but ``real ÷ synthetic`` well below 1: the loader keeps up only by taking CPU from the model (a
CPU-only run); ``compute_slowdown`` (real step time without the wait ÷ synthetic step time) says how much.
"""
from __future__ import annotations

import time
from typing import Callable, List, Tuple


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_train_bench(cfg, steps: int, warmup: int, rounds: int, min_seconds: float,
                    log: Callable[[str], None] = print) -> Tuple[dict, List[dict]]:
    """(summary, per-phase rows) for a trainer Config."""
    import torch

    from dali_ba.loader import BatchAugmentLoader
    from trainers import dist as tdist
    from trainers.config import for_world
    from trainers.engine import build_engine
    from trainers.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # as the trainer does, so the benchmark measures the same steps
    env = tdist.setup(cfg.train.dist_timeout_s)
    cfg = for_world(cfg, env.world)  # data.global_batch_size → this world's B, as the trainer does
    torch.manual_seed(cfg.train.seed)
    loader = BatchAugmentLoader.from_config(cfg.data, seed=cfg.train.seed, channels_last=cfg.train.channels_last)
    classes = cfg.model.num_classes or len(loader.classes)
    engine = build_engine(cfg, env, classes)
    b, m, size = cfg.data.batch_size, cfg.data.num_views, cfg.data.image_size
    lr = 1e-3  # the value does not matter for speed; small so nothing diverges

    def batches():
        while True:
            yield from loader

    real_batches = batches()
    synthetic = (torch.randn(b * m, 3, size, size, device=env.device).contiguous(memory_format=engine.memory_format),
                 torch.randint(0, classes, (b * m,), device=env.device))
    engine.model.train()
    counter = [0]

    def one_step(fetch) -> float:
        """One step; returns the seconds spent waiting for its batch."""
        t0 = time.perf_counter()
        images, labels = fetch()
        waited = time.perf_counter() - t0
        engine.step(images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True), lr, counter[0])
        _sync(env.device)
        counter[0] += 1
        return waited

    def run_phase(fetch, n: int) -> Tuple[int, float, float]:
        for _ in range(warmup):
            one_step(fetch)
        done, wait, t0 = 0, 0.0, time.perf_counter()
        while done < n or time.perf_counter() - t0 < min_seconds:
            wait += one_step(fetch)
            done += 1
        return done, wait, time.perf_counter() - t0

    phases = (("real", lambda: next(real_batches)), ("synthetic", lambda: synthetic))
    rows: List[dict] = []
    for r in range(rounds):
        for phase, fetch in phases:
            done, wait, total = run_phase(fetch, steps)
            row = {"round": r, "phase": phase, "steps": done, "seconds": total, "data_wait_s": wait,
                   "steps_per_s": done / total, "images_per_s": done * b / total, "samples_per_s": done * b * m / total}
            rows.append(row)
            waited = f", data wait {wait / total:.0%}" if phase == "real" else ""
            log(f"round {r + 1}/{rounds} {phase:<9}: {row['steps_per_s']:.2f} steps/s, "
                f"{row['images_per_s']:.1f} img/s, {row['samples_per_s']:.1f} samples/s{waited}")
    tdist.shutdown(env)
    return summarise(rows, b, m, cfg), rows


def summarise(rows: List[dict], b: int, m: int, cfg) -> dict:
    real = [x for x in rows if x["phase"] == "real"]
    syn = [x for x in rows if x["phase"] == "synthetic"]
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
    return {
        "real_images_per_s": real_ips,
        "real_samples_per_s": real_ips * m,
        "synthetic_images_per_s": syn_ips,
        "synthetic_samples_per_s": syn_ips * m,
        "real_vs_synthetic": real_ips / syn_ips,
        "data_wait_fraction": wait_fraction,
        "compute_slowdown": compute_per_step / synthetic_per_step,
        "data_bound": wait_fraction > 0.1,
        "verdict": verdict,
        "compiled": cfg.train.compile,
        "model": cfg.model.arch,
        "batch_size": b,
        "num_views": m,
        "amp": cfg.train.amp,
        "channels_last": cfg.train.channels_last,
    }
