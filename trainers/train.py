"""Entry point: ``python -m trainers.train --config pipelines/X.yaml [key=value ...]``.

Also under torchrun (``torchrun --nproc_per_node=N [--nnodes ... --rdzv-*] -m trainers.train ...``)
and ``dali-ba train``. Expected errors (bad config, missing resume path, undecodable files) print
one line and exit 2; a pre-empted run (SIGTERM/SIGUSR1) saves a checkpoint and exits 0; a rank whose
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
    parser = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run recipe (YAML), e.g. pipelines/fashion-mnist-ba4.yaml")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="auto | none | a run directory | a checkpoint file (same as train.resume=PATH)")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config and the paths it names (exit 0, or 2 with one line)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_views=2")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dali_ba.errors import UserError
    from trainers.config import for_world, load_config

    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        for_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # a global batch that does not divide
        _preflight(cfg)
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
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - only collectives that lost a peer become one line
        from trainers.faults import lost_peer, lost_peer_message

        if os.environ.get("WORLD_SIZE", "1") != "1" and lost_peer(exc):
            _error_line(lost_peer_message(exc))
            return 1
        raise


def _preflight(cfg) -> None:
    """The mistakes that need no torch to find (a wrong path), found before torch is imported."""
    from dali_ba.dataset import check_dataset_paths
    from trainers.checkpoint import resolve_resume

    check_dataset_paths(cfg.data.train_root, cfg.data.train_list)
    if cfg.data.val_root is not None:
        check_dataset_paths(cfg.data.val_root)
    resolve_resume(cfg.train.resume, cfg.train.out_dir)


def _error_line(message: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"{prefix}trainers.train: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
