"""dali-ba: batch-augmentation data pipelines on NVIDIA DALI, with a thin PyTorch iterator.

Public API (stable): ``BatchAugmentLoader``, ``EvalLoader``, ``load_config``.
Imports are lazy so that ``import dali_ba`` (and the CLI's --help) stays fast and does not
load DALI or torch until a loader is actually used.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["BatchAugmentLoader", "EvalLoader", "load_config", "Config", "ConfigError", "__version__"]

_LAZY = {
    "BatchAugmentLoader": "dali_ba.loader",
    "EvalLoader": "dali_ba.loader",
    "load_config": "dali_ba.config",
    "Config": "dali_ba.config",
    "ConfigError": "dali_ba.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dali_ba' has no attribute {name!r}")
