"""``dali-ba bench``: throughput, side by side, recorded with the machine, versions, commit and command.

- ``dali-ba bench loader --root DIR --views 1,2,4,8 --variants dali-fused,dali-naive,torchvision
  --batch-size 64 --threads T --repeats R --json out.json --plot out.png``: the loaders of
  ``loader_bench`` in interleaved rounds; a markdown table on stdout, JSON, a PNG plot.
  ``--epoch-images N`` reads N images only, so epochs are short and their boundaries show.
  On a GPU (``--device cuda``) DALI decodes with ``device="mixed"`` (``--hw-decoder-load`` takes
  a list: a sweep) and the defaults warm up and time longer.
- ``dali-ba bench train --config X --steps N``: the trainer's step with the real pipeline versus
  synthetic tensors already on the device, and the data-wait fraction (``train_bench``).
  ``--compare NAME:KEY=VALUE,…`` (repeatable) instead times the step on synthetic tensors with
  and without those overrides (mixup, an EMA, …), interleaved in one process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Sequence

from benchmarks.record import PLOT_SUFFIXES, check_writable, new_record, write_output, write_record
from dali_ba.errors import UserError

# Warm-up batches and seconds per measurement: a GPU needs far more than a CPU to reach its pace.
DEFAULTS = {"cpu": {"warmup": 3, "min_seconds": 3.0}, "cuda": {"warmup": 50, "min_seconds": 10.0}}


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
    from benchmarks.loader_bench import ALL_VARIANTS

    sub = parser.add_subparsers(dest="bench", required=True)
    loader = sub.add_parser("loader", help="loader throughput: ours against the alternatives",
                            description="Loader throughput, side by side, in interleaved rounds.")
    loader.add_argument("--root", required=True, help="ImageFolder root (root/<class>/<image>.jpg)")
    loader.add_argument("--views", type=_int_list, default=[1, 2, 4, 8], help="M values (default 1,2,4,8)")
    loader.add_argument("--variants", default="dali-fused,dali-naive,torchvision",
                        help=f"comma-separated, from: {', '.join(ALL_VARIANTS)}")
    loader.add_argument("--batch-size", type=int, default=64, help="B unique images per batch (default 64)")
    loader.add_argument("--threads", type=int, default=2, help="DALI num_threads = DataLoader num_workers")
    loader.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians over them)")
    loader.add_argument("--batches", type=int, default=12, help="timed batches per measurement (at least)")
    loader.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: 3 CPU, 50 GPU)")
    loader.add_argument("--min-seconds", type=float, default=None,
                        help="time each measurement for at least this long (default: 3 CPU, 10 GPU)")
    loader.add_argument("--epoch-images", type=int, default=0,
                        help="read only this many images (short epochs: shows the epoch-boundary cost)")
    loader.add_argument("--packed", default=None, metavar="DIR",
                        help="the same images packed (dali-ba data pack): adds the dali-packed variant")
    loader.add_argument("--packed-s3", default=None, metavar="URL",
                        help="the same images packed at an s3:// URL: adds the dali-packed-s3 variant")
    loader.add_argument("--image-size", type=int, default=224)
    loader.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): cuda when a GPU is visible")
    loader.add_argument("--hw-decoder-load", type=_float_list, default=None,
                        help="GPU only: DALI hw_decoder_load values to sweep, e.g. 0.12,0.4,0.65")
    loader.add_argument("--trivial-augment", action="store_true",
                        help="TrivialAugment-Wide in every view (DALI recipe variants only)")
    loader.add_argument("--seed", type=int, default=0)
    loader.add_argument("--json", default=None, help="write the results here")
    loader.add_argument("--plot", default=None, help="write a PNG plot here")
    loader.set_defaults(_bench=run_loader)

    train = sub.add_parser("train", help="training throughput: real pipeline vs synthetic tensors",
                           description="The trainer's step with the real pipeline and with synthetic tensors "
                                       "already on the device; the data-wait fraction.")
    train.add_argument("--config", required=True, help="pipelines/*.yaml")
    train.add_argument("--steps", type=int, default=20, help="timed steps per phase and round (at least)")
    train.add_argument("--warmup", type=int, default=None, help="untimed steps before each phase (3 CPU, 20 GPU)")
    train.add_argument("--min-seconds", type=float, default=0.0, help="time each phase for at least this long")
    train.add_argument("--rounds", type=int, default=2, help="alternating real/synthetic rounds")
    train.add_argument("--json", default=None, help="write the results here")
    train.add_argument("--compare", action="append", default=None, metavar="NAME:KEY=VALUE,…",
                       help="instead: the step on synthetic tensors with and without these overrides (repeatable, "
                            "e.g. mix:train.mixup=0.2,train.cutmix=1.0), interleaved in one process")
    train.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. data.num_views=2)")
    train.set_defaults(_bench=run_train)


def run(args: argparse.Namespace) -> int:
    return args._bench(args)


def _positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected a value >= 1; got {value}")


def _not_negative(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 0:  # NaN too
            raise UserError(f"--{name.replace('_', '-')}: expected a value >= 0; got {value}")


def settings_from_args(args: argparse.Namespace):
    from benchmarks.loader_bench import ALL_VARIANTS, LoaderBenchSettings
    from dali_ba.pipeline import resolve_device

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown or not variants:
        raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; expected some of "
                        f"{', '.join(ALL_VARIANTS)}")
    try:
        device = resolve_device(args.device)
    except UserError:
        raise UserError("--device cuda needs a CUDA GPU and none is visible: GPU benchmarks cannot run on this "
                        "machine (use --device cpu)") from None
    if device != "cuda" and args.hw_decoder_load is not None:
        raise UserError("--hw-decoder-load is a GPU setting (nvJPEG hardware decoder); it needs --device cuda")
    _positive(args, ("batch_size", "threads", "repeats", "batches", "image_size"))
    _not_negative(args, ("epoch_images", "min_seconds", "warmup", "seed"))
    from dali_ba.options import UPPER_LIMITS

    if args.threads > UPPER_LIMITS["num_threads"]:
        raise UserError(f"--threads: expected a value <= {UPPER_LIMITS['num_threads']}; got {args.threads}")
    if not Path(args.root).expanduser().is_dir():
        raise UserError(f"--root: image folder not found: {args.root}")
    for flag, value, variant in (("--packed", args.packed, "dali-packed"), ("--packed-s3", args.packed_s3,
                                                                             "dali-packed-s3")):
        if value and variant not in variants:
            variants.append(variant)
        if variant in variants and not value:
            raise UserError(f"--variants {variant} needs {flag}")
    if args.epoch_images and (args.packed or args.packed_s3):
        raise UserError("--epoch-images reads a subset of --root; a packed dataset is read whole: pack the subset")
    foreign = [v for v in variants if v in ("torchvision", "dali-rn50")]
    if args.trivial_augment and foreign:
        raise UserError(f"--trivial-augment is an option of our DALI recipe; {', '.join(foreign)} would run without "
                        "it and not be comparable (drop them from --variants)")
    defaults = DEFAULTS[device]
    return LoaderBenchSettings(
        root=str(Path(args.root).expanduser()), views=args.views, variants=variants, batch_size=args.batch_size,
        threads=args.threads, repeats=args.repeats, batches=args.batches,
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        min_seconds=args.min_seconds if args.min_seconds is not None else defaults["min_seconds"],
        image_size=args.image_size, device=device, hw_decoder_loads=args.hw_decoder_load or [0.65], seed=args.seed,
        epoch_images=args.epoch_images, packed=args.packed, packed_s3=args.packed_s3,
        options={"trivial_augment": True} if args.trivial_augment else {},
    )


def check_images(settings) -> None:
    """UserError unless ``settings.root`` scans and holds a batch of the images an epoch reads."""
    from dali_ba.dataset import scan_image_folder

    images = len(scan_image_folder(settings.root, settings.file_list))
    usable = min(images, settings.epoch_images or images)
    if settings.batch_size > usable:
        raise UserError(f"--batch-size {settings.batch_size}: more than the {usable} images a benchmark epoch reads "
                        "(--root, --epoch-images)")


def run_loader(args: argparse.Namespace) -> int:
    import time
    from dataclasses import asdict

    from benchmarks.loader_bench import ratios, run_rounds
    from benchmarks.report import markdown_ratios, markdown_table, plot_loader
    from benchmarks.variants import prepare

    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot", suffixes=PLOT_SUFFIXES)
    from dali_ba.outputs import inside

    if args.plot and inside(args.plot, args.root):  # an image in a class folder would become training data
        raise UserError(f"--plot {args.plot}: inside --root {args.root}; write the plot elsewhere")
    settings = settings_from_args(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'dali-ba[plot]'") from None
    check_images(settings)  # a bad folder, or too few images for a batch: before any measurement
    prepare(settings)
    record = new_record("loader")
    started = time.time()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"bench loader: {len(settings.variants)} variant(s) × M in {list(settings.views)} × {settings.repeats} "
        f"round(s), at least {settings.batches} timed batches of {settings.batch_size} and "
        f"{settings.min_seconds:g} s each, device {settings.device}")
    results = run_rounds(settings, log=log)
    record.update(duration_s=round(time.time() - started, 1), settings=asdict(settings), results=results,
                  ratios=ratios(results))
    print(markdown_table(results))
    print()
    print(markdown_ratios(record["ratios"]))
    if args.json:
        write_output(lambda path: write_record(path, record), args.json, "--json")
        log(f"wrote {args.json}")
    if args.plot:
        write_output(lambda path: plot_loader(record, path), args.plot, "--plot")
        log(f"wrote {args.plot}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from benchmarks.train_bench import run_train_bench
    from trainers.config import load_config

    _positive(args, ("steps", "rounds"))
    _not_negative(args, ("warmup", "min_seconds"))
    cfg = load_config(args.config, args.overrides)
    check_writable(args.json, "--json")
    from dali_ba.pipeline import resolve_device

    warmup = args.warmup if args.warmup is not None else (20 if resolve_device(cfg.data.device) == "cuda" else 3)
    if args.compare:
        return _run_step_comparison(args, cfg, warmup)
    record = new_record("train")
    summary, rows = run_train_bench(cfg, args.steps, warmup, args.rounds, args.min_seconds,
                                    log=lambda line: print(line, file=sys.stderr, flush=True))
    s = summary
    print(f"| phase | images/s | samples/s (×M={s['num_views']}) |\n|---|---:|---:|\n"
          f"| real pipeline | {s['real_images_per_s']:.1f} | {s['real_samples_per_s']:.1f} |\n"
          f"| synthetic | {s['synthetic_images_per_s']:.1f} | {s['synthetic_samples_per_s']:.1f} |\n\n"
          f"real ÷ synthetic: {s['real_vs_synthetic']:.2f}; data-wait fraction: {s['data_wait_fraction']:.1%}; "
          f"compute slowdown {s['compute_slowdown']:.2f}× ({s['verdict']}); model {s['model']}, "
          f"B={s['batch_size']}, M={s['num_views']}, amp {s['amp']}, DALI threads {cfg.data.num_threads}")
    if args.json:
        record.update(config=asdict(cfg), summary=summary, rounds=rows, warmup=warmup)
        write_output(lambda path: write_record(path, record), args.json, "--json")
    return 0


def _run_step_comparison(args: argparse.Namespace, cfg, warmup: int) -> int:
    from dataclasses import asdict

    from benchmarks.train_bench import run_step_comparison
    from trainers.config import load_config

    variants = []
    for item in args.compare:
        name, sep, overrides = item.partition(":")
        if not sep or not name or name == "base" or not overrides:
            raise UserError(f"--compare: expected NAME:KEY=VALUE[,KEY=VALUE…] (NAME not 'base'); got {item!r}")
        variants.append((name, load_config(args.config, [*args.overrides, *overrides.split(",")])))
    record = new_record("train-options")
    summary, rows = run_step_comparison(cfg, variants, args.steps, warmup, args.rounds,
                                        log=lambda line: print(line, file=sys.stderr, flush=True))
    print("| variant | overrides | ms per step (median) | ÷ base | CPU ms per step | ÷ base |\n"
          "|---|---|---:|---:|---:|---:|")
    for name, item in [("base", "base:"), *zip([n for n, _ in variants], args.compare)]:
        s = summary[name]
        print(f"| {name} | {item.partition(':')[2] or '–'} | {s['step_s'] * 1e3:.1f} | {s['step_s_vs_base']:.3f} | "
              f"{s['cpu_s'] * 1e3:.1f} | {s['cpu_s_vs_base']:.3f} |")
    if args.json:
        record.update(config=asdict(cfg), compare=args.compare, summary=summary, rounds=rows, warmup=warmup)
        write_record(args.json, record)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from dali_ba.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m benchmarks.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"dali-ba bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
