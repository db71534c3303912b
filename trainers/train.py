"""Entry point: ``python -m trainers.train --config pipelines/X.yaml [key=value ...]``.

Also under torchrun (``torchrun --nproc_per_node=N [--nnodes ... --rdzv-*] -m trainers.train ...``)
and ``dali-ba train``. Expected errors (bad config, missing resume path, undecodable files) print
one line and exit 2; a pre-empted run (SIGTERM/SIGUSR1) saves a checkpoint and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run recipe (YAML), e.g. pipelines/fashion-mnist-ba4.yaml")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="auto | none | a run directory | a checkpoint file (same as train.resume=PATH)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_views=2")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dali_ba.config import load_config
    from dali_ba.errors import UserError

    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        from trainers.loop import run

        return run(cfg)
    except UserError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}trainers.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
