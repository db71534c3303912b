"""Entry point: ``python -m trainers.train --config pipelines/X.yaml [key=value ...]``.

Also under torchrun (``torchrun --nproc_per_node=N [--nnodes ... --rdzv-*] -m trainers.train ...``)
and ``dali-ba train``. Expected errors (bad config, missing resume path, undecodable files, a loss that
is not finite, out of memory) print one line and exit 2; a pre-empted run (SIGTERM/SIGUSR1) saves a
checkpoint and exits 0, an interrupted one (SIGINT, Ctrl-C) saves one and exits 130; a rank whose
peer died or hung (a failed collective) prints one line and exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

SILENT_RANK_EXIT_DELAY_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    from dali_ba.dataset import expand_path
    from dali_ba.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m trainers.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=expand_path,
                        help="run recipe (YAML), e.g. pipelines/fashion-mnist-ba4.yaml")
    parser.add_argument("--resume", default=None, metavar="PATH", type=expand_path,
                        help="auto | none | a run directory | a checkpoint file (same as train.resume=PATH)")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config, the data and the paths it names (exit 0, or 2 with one "
                             "line); WORLD_SIZE: the number of processes that will train")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_views=2")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    """(args, overrides in the order given): overrides may stand before, between or after the
    options; ``--resume X`` and a different ``train.resume=Y`` contradict each other (refused)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(args.overrides) + extra
    if args.resume:
        given = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "train.resume"]
        if any(value != args.resume for value in given):
            parser.error(f"--resume {args.resume} and train.resume={given[-1]} contradict each other: give one")
        overrides.append(f"train.resume={args.resume}")
    return args, overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dali_ba.errors import UserError, make_console_safe
    from trainers.config import for_world, load_config

    make_console_safe()
    args, overrides = parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, overrides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for_world(cfg, world)  # a global batch that does not divide
        _preflight(cfg, deep=args.check, world=world)
        if args.check:
            return 0
        from trainers.loop import run  # torch, DALI: seconds to import

        return run(cfg)
    except UserError as exc:
        if getattr(exc, "all_ranks", False) and os.environ.get("RANK", "0") != "0":
            # Every rank has the same message and rank 0 prints it; exiting at once could make
            # torchrun stop rank 0 before it has.
            time.sleep(SILENT_RANK_EXIT_DELAY_S)
            return 2
        _error_line(str(exc))
        return 2
    except KeyboardInterrupt:  # before the run's own handler was installed, or after it was removed
        _error_line("interrupted before training started: nothing was saved")
        return 130
    except Exception as exc:  # noqa: BLE001 - collectives that lost a peer, memory: one line
        from trainers.faults import lost_peer, lost_peer_message
        from trainers.resources import is_out_of_memory, out_of_memory

        if os.environ.get("WORLD_SIZE", "1") != "1" and lost_peer(exc):
            _error_line(lost_peer_message(exc))
            return 1
        if cfg is not None and is_out_of_memory(exc):
            _error_line(str(out_of_memory(exc, cfg, "", "the last checkpoint, if any, is intact")))
            return 2
        raise


def _preflight(cfg, deep: bool = False, world: int = 1) -> None:
    """The mistakes that need no torch to find, found before torch is imported: wrong paths, an
    output folder that cannot be used; with ``deep`` (``--check``, run once by ``dali-ba train``
    before it starts N ranks) also the data itself: the classes, enough images for a batch, a
    schedule that fits the run, loader batches that fit in memory."""
    from dali_ba.dataset import check_dataset_paths
    from trainers import outdir
    from trainers.checkpoint import resolve_resume

    check_dataset_paths(cfg.data.train_root, cfg.data.train_list)
    if cfg.data.val_root is not None:
        check_dataset_paths(cfg.data.val_root)
    resolve_resume(cfg.train.resume, cfg.train.out_dir)
    outdir.check(cfg)
    if deep:
        _check_data(cfg, world)


def _check_data(cfg, world: int) -> None:
    """What the ranks would find when they load the data (loose local files only: a packed or
    remote dataset is opened by the ranks themselves)."""
    from dali_ba.dataset import align_classes, scan_image_folder
    from dali_ba.errors import ConfigError, DatasetError
    from dali_ba.packed import is_packed
    from trainers.config import for_world
    from trainers.resources import check_host_memory
    from trainers.schedule import build_schedule

    cfg = for_world(cfg, world)
    d = cfg.data
    check_host_memory(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if "://" in d.train_root or (d.train_list is None and is_packed(d.train_root)):
        return
    train = scan_image_folder(d.train_root, d.train_list)
    steps = len(train) // (d.batch_size * world)
    if steps == 0:
        raise DatasetError(f"batch_size={d.batch_size} × {world} shard(s) needs at least {d.batch_size * world} "
                           f"images; {train.root} has {len(train)}")
    if 0 < cfg.model.num_classes < len(train.classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(train.classes)} "
                          f"classes of {d.train_root} (0 = take the number from the data)")
    if d.val_root and "://" not in d.val_root and not is_packed(d.val_root):
        align_classes(scan_image_folder(d.val_root), train.classes, "the training set", d.val_root)
    build_schedule(cfg, steps, world)


def _error_line(message: str) -> None:
    from dali_ba.errors import one_line

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"{prefix}trainers.train: error: {one_line(message)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
