"""The ``dali-ba`` command line: one sub-command per concern, each defined in its own module.

Every module listed in ``_COMMANDS`` exposes ``add_arguments(parser)`` and ``run(args) -> int``
and keeps its heavy imports (DALI, torch) inside ``run`` so ``dali-ba --help`` stays instant.
Expected errors (bad config, missing folders, undecodable files) print one line and exit 2;
only bugs show a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# (command path, module, help)
_COMMANDS = [
    (("data", "synth"), "dali_ba.data.synth", "write ImageNet-like JPEGs in ImageFolder layout"),
    (
        ("data", "fashion-mnist"),
        "dali_ba.data.fashion_mnist",
        "real Fashion-MNIST images (Debian package) as JPEG folders",
    ),
    (("data", "verify"), "dali_ba.data.verify", "find every file DALI cannot decode"),
    (("data", "pack"), "dali_ba.data.pack", "pack images into WebDataset shards + DALI indexes (folder or s3://)"),
    (("show",), "dali_ba.viz", "PNG grid: one row per image, its M augmented views in columns"),
    (("bench",), "dali_ba.bench_command", "throughput benchmarks, side by side (from a source checkout)"),
    (("train",), "dali_ba.train_launcher", "train a ResNet (the trainers package; also under torchrun)"),
]


def build_parser() -> argparse.ArgumentParser:
    from dali_ba import __version__
    from dali_ba.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="dali-ba", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dali-ba {__version__}")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module_name, help_text in _COMMANDS:
        parent = top
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} tools")
                groups[path[0]] = group.add_subparsers(dest="subcommand", required=True)
            parent = groups[path[0]]
        sub = parent.add_parser(path[-1], help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dali_ba.errors import UserError, make_console_safe, one_line

    make_console_safe()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only commands with key=value overrides (train, bench train) take free arguments, in the order
    # given wherever they stand among the options; anything else unknown is an error.
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = list(getattr(args, "overrides", []) or []) + extra
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"dali-ba: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dali-ba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
