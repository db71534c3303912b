"""The steps of ``gpu_check``, each a function of its Context returning results (and a one-line
``summary``) or raising StepFailed. Every GPU program runs as a child process from the source tree
(``python3 -m dali_ba.cli``, ``-m benchmarks.cli``, ``-m torch.distributed.run -m trainers.train``),
so a step's GPU memory is gone when it ends and a hung step is killed at its deadline.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Sequence

from benchmarks.gpu_check import Context, Step, StepFailed, stop_group
from benchmarks.processes import descendants

STEP_NAMES = ("data", "tests", "probe", "loader", "train", "torchrun")
RECIPE = "pipelines/imagenet-resnet50-ba4.yaml"
THREADS = 8  # DALI threads per GPU, as the ImageNet recipe
MIN_GPU_TESTS = 12
TRAIN_STEPS, KILL_AFTER, CHECKPOINT_EVERY = 150, 60, 50
# The recipe's per-GPU batch of its 8-GPU run (B=32, M·B=128), not its global batch on one GPU (B=256).
ONE_GPU = ("data.global_batch_size=0", "data.batch_size=32")


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (a child's result, after any warnings)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise StepFailed("no JSON result in the output")


def stack_info(ctx: Context) -> dict:
    """The GPU, driver, torch and DALI stack, read in a child process (``gpu_probe info``)."""
    try:
        return last_json(ctx.run([ctx.python, "-m", "benchmarks.gpu_probe", "info"], "info", timeout=60).stdout)
    except StepFailed as exc:
        return {"error": exc.message}


def _data(ctx: Context) -> dict:
    images, classes = int(ctx.options["images"]), 20
    val_images = max(classes, images // 10)
    done = ctx.data / f".complete-{images}-{val_images}"  # written last: a killed generation is not reused
    if done.exists():
        return {"summary": f"reused {ctx.data}", "reused": True}
    ctx.run([ctx.python, "-m", "dali_ba.cli", "data", "synth", str(ctx.data), "--images", str(images),
             "--classes", str(classes), "--val-images", str(val_images), "--overwrite"], "data")
    done.touch()
    return {"summary": f"{images} train + {val_images} val JPEGs (~500x375) in {ctx.data}", "images": images,
            "val_images": val_images}


def _tests(ctx: Context) -> dict:
    xml = ctx.work / "gpu-tests.xml"
    failure = None
    try:
        ctx.run([ctx.python, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
                 f"--junitxml={xml}", "-o", "junit_family=xunit1"], "tests")
    except StepFailed as exc:
        failure = exc
    result = junit_summary(xml) if xml.exists() else {}
    if failure is not None:
        raise StepFailed(f"{failure.message}; failed: {', '.join(result.get('failed', [])) or '?'}", result)
    if result["collected"] < MIN_GPU_TESTS:
        raise StepFailed(f"only {result['collected']} GPU tests collected (expected >= {MIN_GPU_TESTS})", result)
    return result


def junit_summary(path: Path) -> dict:
    """Counts and names from pytest's JUnit XML."""
    passed, failed, skipped = [], [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}"[:200])
        else:
            passed.append(name)
    return {"summary": f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped",
            "collected": len(passed) + len(failed) + len(skipped), "passed": passed, "failed": failed,
            "skipped": skipped}


# The child commands, one function each (tests/test_gpu_check.py parses them with the real parsers).

def probe_argv(ctx: Context, hints: str) -> List[str]:
    return [ctx.python, "-m", "benchmarks.gpu_probe", "memory", "--root", str(ctx.data / "train"),
            "--val-root", str(ctx.data / "val"), "--hints", hints, "--threads", str(THREADS)]


LOADER_RUNS = {  # name: the arguments besides the common ones
    "loader": ["--views", "1,4", "--min-seconds", "3", "--variants", "dali-fused,dali-naive,dali-naive-crop,dali-rn50"],
    "loader-hw-sweep": ["--views", "4", "--min-seconds", "2", "--variants", "dali-fused",
                        "--hw-decoder-load", "0.12,0.4,0.65,0.9"],
    "loader-trivial-augment": ["--views", "4", "--min-seconds", "2", "--variants", "dali-fused", "--trivial-augment"],
}


def loader_argv(ctx: Context, name: str) -> List[str]:
    return [ctx.python, "-m", "benchmarks.cli", "loader", "--root", str(ctx.data / "train"), "--device", "cuda",
            "--batch-size", "64", "--threads", str(THREADS), "--repeats", "1", "--warmup", "20", "--batches", "20",
            "--json", str(ctx.work / f"{name}.json"), *LOADER_RUNS[name]]


def train_argv(ctx: Context, views: int) -> List[str]:
    return [ctx.python, "-m", "benchmarks.cli", "train", "--config", RECIPE, "--steps", "20", "--warmup", "8",
            "--rounds", "1", "--json", str(ctx.work / f"train-m{views}.json"), f"data.train_root={ctx.data / 'train'}",
            f"data.val_root={ctx.data / 'val'}", f"data.num_views={views}", f"data.num_threads={THREADS}",
            *ONE_GPU, "train.amp=bf16", "train.channels_last=true", "diagnostics.every=0"]


def torchrun_argv(ctx: Context, out: Path) -> List[str]:
    """The trainer under torchrun; ``ctx.options["train_overrides"]`` come last (a CPU test's tiny run)."""
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "trainers.train",
            "--config", str(ctx.options.get("recipe", RECIPE)), f"data.train_root={ctx.data / 'train'}",
            f"data.val_root={ctx.data / 'val'}", f"data.num_threads={THREADS}", *ONE_GPU, f"train.out_dir={out}",
            "train.resume=auto", f"train.max_steps={TRAIN_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.log_every=10", "diagnostics.every=0", "eval.batch_size=64",
            *ctx.options.get("train_overrides", [])]


def _probe(ctx: Context) -> dict:
    runs = []
    for hints in ("off", "on"):
        out = ctx.run(probe_argv(ctx, hints), f"probe-hints-{hints}").stdout
        runs.append(last_json(out))
    result = {"runs": runs, "summary": "; ".join(
        f"hints {r['hints']}: first batch {r['first_batch_s']:.1f} s, device {r['device_used_mib'][-1]:.0f} MiB, "
        f"growth after epoch 1 {r['device_growth_mib']:+.0f} MiB" for r in runs)}
    grown = [r for r in runs if not r["flat"]]
    if grown:
        raise StepFailed(f"memory kept growing over the epochs (hints {', '.join(r['hints'] for r in grown)})", result)
    return result


def _bench_loader(ctx: Context, name: str) -> dict:
    ctx.run(loader_argv(ctx, name), name)
    record = json.loads((ctx.work / f"{name}.json").read_text())
    rows = [{k: r.get(k) for k in ("variant", "num_views", "hw_decoder_load", "images_per_s", "views_per_s",
                                   "cpu_s_per_image", "epoch_boundary_s")} for r in record["results"]]
    return {"results": rows, "ratios": record.get("ratios")}


def _loader(ctx: Context) -> dict:
    main, sweep = _bench_loader(ctx, "loader"), _bench_loader(ctx, "loader-hw-sweep")
    ta = _bench_loader(ctx, "loader-trivial-augment")["results"][0]["images_per_s"]
    by = {(r["variant"], r["num_views"]): r["images_per_s"] for r in main["results"]}
    best = max(sweep["results"], key=lambda r: r["images_per_s"])
    text = ", ".join(f"{v} M={m} {ips:.0f}" for (v, m), ips in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])))
    return {"main": main, "hw_sweep": sweep, "trivial_augment_m4_images_per_s": ta,
            "summary": f"img/s: {text}; best hw_decoder_load {best['hw_decoder_load']} ({best['images_per_s']:.0f}); "
                       f"fused M=4 with TrivialAugment {ta:.0f}"}


def _train(ctx: Context) -> dict:
    out = {}
    for m in (1, 4):
        ctx.run(train_argv(ctx, m), f"train-m{m}")
        out[f"M={m}"] = json.loads((ctx.work / f"train-m{m}.json").read_text())["summary"]
    out["summary"] = "; ".join(
        f"{k}: real {s['real_images_per_s']:.0f} vs synthetic {s['synthetic_images_per_s']:.0f} img/s, "
        f"data wait {s['data_wait_fraction']:.0%}" for k, s in out.items())
    return out


def _metrics(path: Path) -> List[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by the kill
            pass
    return rows


def _torchrun(ctx: Context) -> dict:
    """The trainer on torchrun + NCCL (gloo without CUDA), stopped mid-run by a signal, then resumed."""
    import torch

    out = ctx.work / "torchrun-run"
    cmd = torchrun_argv(ctx, out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sig = signal.SIGKILL if ctx.options.get("kill_signal") == "KILL" else signal.SIGTERM
    first = ctx.start(cmd, "torchrun-first")
    metrics, seen = out / "metrics.jsonl", 0
    while first.poll() is None and seen < KILL_AFTER and ctx.left() > 0:
        seen = max([r["step"] for r in _metrics(metrics) if r.get("kind") == "train"] or [0])
        time.sleep(0.1)
    if first.poll() is not None:
        raise StepFailed(f"the first run ended (exit {first.returncode}) before step {KILL_AFTER} "
                         f"(log: {ctx.work / 'torchrun-first.log'})")
    if seen < KILL_AFTER:
        raise StepFailed(f"out of time before step {KILL_AFTER} (reached {seen})")
    if sig == signal.SIGTERM:
        first.send_signal(sig)  # to torchrun, as `docker stop` or SLURM would; it passes it on
    else:  # a crash: torchrun and its workers die at once (a dead torchrun would pass nothing on)
        for pid in [first.pid, *descendants(first.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        first.wait(timeout=max(5.0, min(120.0, ctx.left())))
    except subprocess.TimeoutExpired:
        stop_group(first)
        raise StepFailed(f"torchrun did not exit within 120 s of SIG{sig.name[3:]}") from None
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        raise StepFailed(f"no checkpoint after SIG{sig.name[3:]} at step >= {seen}")
    saved = int(torch.load(last, map_location="cpu", weights_only=False)["step"])
    preempted = (out / "PREEMPTED").read_text().strip() if (out / "PREEMPTED").exists() else None
    result = {"signal": sig.name, "signalled_after_step": seen, "checkpoint_step": saved, "preempted": preempted,
              "first_exit": first.returncode}
    if saved >= TRAIN_STEPS:
        raise StepFailed(f"the first run reached step {saved} before SIG{sig.name[3:]} took effect", result)
    if sig == signal.SIGTERM and (preempted is None or not preempted.endswith(f"at step {saved}; resume with "
                                                                                 "train.resume=auto")):
        raise StepFailed(f"SIGTERM: expected a PREEMPTED marker for step {saved}, found {preempted!r}", result)
    ctx.run(cmd, "torchrun-resume")
    rows = _metrics(metrics)
    starts = [r for r in rows if r.get("kind") == "event" and r.get("event") == "start"]
    ends = [r for r in rows if r.get("kind") == "event" and r.get("event") == "end"]
    after = [r for r in rows[rows.index(starts[-1]):] if r.get("kind") == "train"] if starts else []
    result.update(resumed_at=starts[-1]["step"] if len(starts) >= 2 else None,
                  resumed_from=starts[-1].get("resumed_from") if starts else None,
                  end_step=ends[-1]["step"] if ends else None,
                  losses={r["step"]: r["loss"] for r in rows if r.get("kind") == "train"},
                  samples_per_s=[r["samples_per_s"] for r in after], data_time=[r["data_time"] for r in after],
                  evals=[{k: r[k] for k in ("step", "val_top1", "val_images")}
                         for r in rows if r.get("kind") == "eval"])
    if len(starts) != 2 or result["resumed_at"] != saved or not result["resumed_from"]:
        raise StepFailed(f"the second run did not resume from the checkpoint's step {saved} "
                         f"(start events at {[r['step'] for r in starts]})", result)
    if result["end_step"] != TRAIN_STEPS or not after or after[0]["step"] <= saved:
        raise StepFailed(f"the resumed run did not continue to step {TRAIN_STEPS} (end {result['end_step']})", result)
    speed = sorted(result["samples_per_s"])[len(after) // 2]
    result["summary"] = (f"SIG{sig.name[3:]} after step {seen}, checkpoint at {saved}, resumed there and finished "
                         f"step {TRAIN_STEPS}; median {speed:.0f} samples/s")
    return result


# Budgets (seconds; each step's timeout), 460 in all, leaving ~20 s of the 480 for reading the stack.
_FUNCTIONS = {"data": (_data, 30.0), "tests": (_tests, 115.0), "probe": (_probe, 40.0), "loader": (_loader, 95.0),
              "train": (_train, 70.0), "torchrun": (_torchrun, 110.0)}


def steps(names: Sequence[str]) -> List[Step]:
    return [Step(n, _FUNCTIONS[n][1], _FUNCTIONS[n][0]) for n in STEP_NAMES if n in names]


def dry_steps(names: Sequence[str]) -> List[Step]:
    """Stand-ins with the real names and budgets (``--dry-run``): no GPU, no child process."""
    return [Step(n, _FUNCTIONS[n][1], lambda ctx, n=n: {"summary": f"dry run: {n} not run", "dry_run": True})
            for n in STEP_NAMES if n in names]


def dry_info() -> Dict[str, object]:
    return {"device_name": "dry-run", "dry_run": True}


WARNING = re.compile(r"affinity|warn", re.IGNORECASE)


def collect_warnings(records: List[dict], work: Path) -> None:
    """Lines of each step's logs that mention warnings or CPU affinity (DALI issue #1209), at most 20."""
    for record in records:
        lines: List[str] = []
        for log in sorted(work.glob(f"{record['name']}*.log")):
            lines += [f"{log.name}: {line.strip()[:300]}" for line in log.read_text(errors="replace").splitlines()
                      if WARNING.search(line)]
        if lines:
            record["warnings"] = list(dict.fromkeys(lines))[:20]
