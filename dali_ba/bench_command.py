"""``dali-ba bench``: the benchmarks of a source checkout (``benchmarks/`` beside ``dali_ba/``).

The benchmarks are not part of the installed package: they import the trainer and torchvision,
and a library user needs neither. From a checkout (an editable install, or ``PYTHONPATH=.``)
this command loads ``benchmarks.cli`` from there; elsewhere it says so in one line.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

CHECKOUT = Path(__file__).resolve().parents[1]


def _benchmarks_cli() -> Optional[ModuleType]:
    """``benchmarks.cli`` of this checkout, or None outside a checkout."""
    package = CHECKOUT / "benchmarks" / "__init__.py"
    if not package.is_file():
        return None
    loaded = sys.modules.get("benchmarks")
    if loaded is None or Path(getattr(loaded, "__file__", "") or "").resolve() != package:
        spec = importlib.util.spec_from_file_location("benchmarks", package,
                                                      submodule_search_locations=[str(package.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("benchmarks.cli")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli = _benchmarks_cli()
    if cli is None:
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    cli.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dali_ba.errors import UserError

    cli = _benchmarks_cli()
    if cli is None:
        raise UserError(f"dali-ba bench runs from a source checkout of dali-ba (no benchmarks/ beside {CHECKOUT}/"
                        "dali_ba): clone the repository and run it there")
    return cli.run(args)
