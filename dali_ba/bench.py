"""``dali-ba bench``: throughput, side by side, recorded with the machine, the versions and the command.

- ``dali-ba bench loader --root DIR --views 1,2,4,8 --variants dali-fused,dali-naive,torchvision
  --batch-size 64 --threads T --repeats R --json out.json --plot out.png``: the loaders of
  ``dali_ba.bench_loader`` in interleaved rounds; a markdown table on stdout, JSON, a PNG plot.
  On a GPU (``--device cuda``): DALI decodes with ``device="mixed"`` (``--hw-decoder-load`` takes
  a list: a sweep), torchvision pins memory and copies to the GPU; ``--preset dali-rn50`` uses the
  settings of DALI's own ResNet-50 CI gate (batch 408, 70 threads, hw_decoder_load 0.12).
- ``dali-ba bench train --config X --steps N``: training throughput with the real pipeline versus
  synthetic tensors already on the device, and the data-wait fraction (``trainers.bench``, run as
  a subprocess: ``dali_ba`` never imports ``trainers``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from dali_ba.errors import UserError

PRESETS = {
    # DALI's ResNet-50 pipeline gate on an H100 in DALI's own CI: >= 19,000 images/s.
    "dali-rn50": dict(batch_size=408, threads=70, hw_decoder_loads=[0.12], views=[1], variants=["dali-fused"],
                      device="cuda", reference_images_per_s=19000),
}
VARIANT_HELP = ("dali-fused (ours: one decode, M views), dali-naive (M decodes), torchvision (ImageFolder + "
                "DataLoader), dali-fused-noaa (ours without antialiasing: an explicit approximation)")


def _int_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected values in [0, 1], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    loader = sub.add_parser("loader", help="loader throughput: ours against the alternatives",
                            description="Loader throughput, side by side, in interleaved rounds.")
    loader.add_argument("--root", required=True, help="ImageFolder root (root/<class>/<image>.jpg)")
    loader.add_argument("--views", type=_int_list, default=None, help="M values, e.g. 1,2,4,8 (default)")
    loader.add_argument("--variants", default=None, help=f"comma-separated, from: {VARIANT_HELP}")
    loader.add_argument("--batch-size", type=int, default=None, help="B unique images per batch (default 64)")
    loader.add_argument("--threads", type=int, default=None,
                        help="DALI num_threads = DataLoader num_workers (default 2)")
    loader.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians over them)")
    loader.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    loader.add_argument("--warmup", type=int, default=3, help="untimed batches before each measurement")
    loader.add_argument("--min-seconds", type=float, default=3.0,
                        help="time each measurement for at least this long (default 3; short ones are noisy)")
    loader.add_argument("--image-size", type=int, default=224)
    loader.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="auto (default): cuda when a GPU is visible")
    loader.add_argument("--hw-decoder-load", type=_float_list, default=None,
                        help="GPU only: DALI hw_decoder_load values to sweep, e.g. 0.12,0.4,0.65")
    loader.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="dali-rn50: DALI's ResNet-50 CI settings (GPU only); explicit flags override it")
    loader.add_argument("--seed", type=int, default=0)
    loader.add_argument("--json", default=None, help="write the results here")
    loader.add_argument("--plot", default=None, help="write a PNG plot here")
    loader.set_defaults(_bench=run_loader)

    train = sub.add_parser("train", help="training throughput: real pipeline vs synthetic tensors",
                           description="Training steps/s with the real pipeline and with synthetic tensors "
                                       "already on the device; the data-wait fraction.")
    train.add_argument("--config", required=True, help="pipelines/*.yaml")
    train.add_argument("--steps", type=int, default=20, help="timed steps per phase and round")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps before each phase")
    train.add_argument("--rounds", type=int, default=2, help="alternating real/synthetic rounds")
    train.add_argument("--json", default=None, help="write the results here")
    train.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. data.num_views=2)")
    train.set_defaults(_bench=run_train)


def run(args: argparse.Namespace) -> int:
    return args._bench(args)


# ---------------------------------------------------------------- loader

def settings_from_args(args: argparse.Namespace):
    from dali_ba.bench_loader import ALL_VARIANTS, LoaderBenchSettings
    from dali_ba.pipeline import resolve_device

    preset = dict(PRESETS.get(args.preset or "", {}))
    reference = preset.pop("reference_images_per_s", None)
    pick = lambda name, default: getattr(args, name) if getattr(args, name) is not None else preset.get(name, default)  # noqa: E731
    variants = args.variants.split(",") if args.variants else preset.get("variants", ["dali-fused", "dali-naive", "torchvision"])
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(ALL_VARIANTS)}")
    device = pick("device", "auto")
    try:
        device = resolve_device(device)
    except UserError:
        raise UserError(f"--device cuda{' (preset ' + args.preset + ')' if args.preset else ''} needs a CUDA GPU "
                        "and none is visible: GPU benchmarks cannot run on this machine (use --device cpu)") from None
    hw = args.hw_decoder_load if args.hw_decoder_load is not None else preset.get("hw_decoder_loads", [0.65])
    if device != "cuda" and args.hw_decoder_load is not None:
        raise UserError("--hw-decoder-load is a GPU setting (nvJPEG hardware decoder); it needs --device cuda")
    for name in ("batch_size", "threads", "repeats", "batches", "image_size"):
        value = pick(name, 1)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected a value >= 1; got {value}")
    if not Path(args.root).is_dir():
        raise UserError(f"--root: image folder not found: {args.root}")
    s = LoaderBenchSettings(
        root=args.root, views=args.views or preset.get("views", [1, 2, 4, 8]), variants=variants,
        batch_size=pick("batch_size", 64), threads=pick("threads", 2), repeats=args.repeats, batches=args.batches,
        warmup=max(0, args.warmup), min_seconds=max(0.0, args.min_seconds), image_size=args.image_size,
        device=device, hw_decoder_loads=hw, seed=args.seed,
    )
    return s, reference


def run_loader(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dali_ba.bench_loader import ratios, run_rounds

    settings, reference = settings_from_args(args)
    argv = sys.argv[1:] if sys.argv[1:2] == ["bench"] else None
    command = "dali-ba " + " ".join(shlex.quote(a) for a in argv) if argv else None
    started, load0 = time.time(), _load_average()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    log(f"bench loader: {len(settings.variants)} variant(s) × M in {list(settings.views)} × {settings.repeats} "
        f"round(s), {settings.batches} timed batches of {settings.batch_size} each, device {settings.device}")
    results = run_rounds(settings, log=log)
    record = {
        "kind": "loader",
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_info(settings.device),
        "versions": versions(),
        "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "load_average": {"start": load0, "end": _load_average()},
        "settings": asdict(settings),
        "results": results,
        "ratios": ratios(results),
    }
    if reference:
        record["reference"] = {"images_per_s": reference, "what": "DALI's RN50 pipeline CI gate on an H100"}
    print(markdown_table(results))
    print()
    print(markdown_ratios(record["ratios"]))
    if args.json:
        _write_json(args.json, record)
        log(f"wrote {args.json}")
    if args.plot:
        plot_loader(record, args.plot)
        log(f"wrote {args.plot}")
    return 0


ENV_KEYS = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "MALLOC_ARENA_MAX", "CUDA_VISIBLE_DEVICES")


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _write_json(path: str, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def machine_info(device: str = "cpu") -> dict:
    info = {
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    except ImportError:  # pragma: no cover
        pass
    try:
        info["transparent_hugepages"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    from importlib import metadata

    from dali_ba import __version__

    out = {"dali_ba": __version__}
    for dist, key in (("nvidia-dali-cuda120", "dali"), ("nvidia-dali-cuda130", "dali"), ("torch", "torch"),
                      ("torchvision", "torchvision"), ("pillow", "pillow"), ("numpy", "numpy")):
        try:
            out.setdefault(key, metadata.version(dist))
        except metadata.PackageNotFoundError:
            pass
    if "dali" not in out:
        try:
            import nvidia.dali

            out["dali"] = nvidia.dali.__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def _label(r: dict) -> str:
    return r["variant"] + (f" (hw {r['hw_decoder_load']:g})" if "hw_decoder_load" in r else "")


def markdown_table(results: List[dict]) -> str:
    lines = ["| variant | M | images/s (median [min–max]) | views/s | CPU ms / image | rounds |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["num_views"], _label(r))):
        lines.append(
            f"| {_label(r)} | {r['num_views']} | {r['images_per_s']:.1f} [{r['images_per_s_min']:.1f}–"
            f"{r['images_per_s_max']:.1f}] | {r['views_per_s']:.1f} | {r['cpu_s_per_image'] * 1e3:.2f} | "
            f"{len(r['repeats'])} |"
        )
    return "\n".join(lines)


def markdown_ratios(ratios: dict) -> str:
    """Ratio of medians, and in brackets the median of the per-round (paired) ratios."""
    keys = [("images_per_s_vs_torchvision", "img/s ÷ torchvision"),
            ("cpu_per_image_vs_torchvision", "CPU/img: torchvision ÷ fused"),
            ("images_per_s_vs_dali-naive", "img/s ÷ dali-naive"),
            ("cpu_per_image_vs_dali-naive", "CPU/img: naive ÷ fused"),
            ("views_per_s_vs_m1", "views/s ÷ views/s at M=1")]
    present = [(k, t) for k, t in keys if any(k in row for row in ratios.values())]
    if not present:
        return ""
    lines = ["| dali-fused at | " + " | ".join(t for _, t in present) + " |", "|---|" + "---:|" * len(present)]
    for m, row in ratios.items():
        cells = []
        for k, _ in present:
            cell = f"{row[k]:.2f}×" if k in row else "–"
            if f"{k}_paired" in row:
                cell += f" ({row[k + '_paired']:.2f}×)"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(ratio of medians; in brackets the median of the same-round ratios)"


def plot_loader(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    fig, (ax_v, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in sorted({_label(r) for r in results}):
        rows = sorted((r for r in results if _label(r) == label), key=lambda r: r["num_views"])
        ms = [r["num_views"] for r in rows]
        views = [r["views_per_s"] for r in rows]
        lo = [r["views_per_s"] - r["images_per_s_min"] * r["num_views"] for r in rows]
        hi = [r["images_per_s_max"] * r["num_views"] - r["views_per_s"] for r in rows]
        ax_v.errorbar(ms, views, yerr=[lo, hi], marker="o", capsize=3, label=label)
        cpu = [r["cpu_s_per_image"] * 1e3 for r in rows]
        clo = [(r["cpu_s_per_image"] - r["cpu_s_per_image_min"]) * 1e3 for r in rows]
        chi = [(r["cpu_s_per_image_max"] - r["cpu_s_per_image"]) * 1e3 for r in rows]
        ax_c.errorbar(ms, cpu, yerr=[clo, chi], marker="o", capsize=3, label=label)
    for ax, ylabel in ((ax_v, "views / s (median, min–max)"), (ax_c, "CPU ms per unique image (all processes)")):
        ax.set_xscale("log", base=2)
        ms_all = sorted({r["num_views"] for r in results})
        ax.set_xticks(ms_all, [str(m) for m in ms_all])
        ax.set_xlabel("M (views per image)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_v.legend(fontsize=8)
    s, m = record["settings"], record["machine"]
    where = m["gpu"]["name"] if m.get("gpu") and s["device"] == "cuda" else f"{m['cpu']} ({m['usable_cpus']} CPUs)"
    env = " ".join(f"{k}={v}" for k, v in (record.get("environment") or {}).items())
    fig.suptitle(f"Loader throughput, B={s['batch_size']}, {s['threads']} threads/workers, "
                 f"{s['image_size']}px, {s['device']} — {where}" + (f" — {env}" if env else ""), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- train

def run_train(args: argparse.Namespace) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "trainers.bench", "--config", args.config, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    if args.json:
        cmd += ["--json", args.json]
    cmd += list(args.overrides or [])
    return subprocess.call(cmd)
