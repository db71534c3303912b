"""dali-ba: batch-augmentation data pipelines on NVIDIA DALI, with a thin PyTorch iterator.

Public API: ``BatchAugmentLoader``, ``EvalLoader`` (the loaders), ``load_config`` / ``DataConfig``
(the ``data:`` section of a YAML recipe), ``ConfigError``. Imports are lazy so that
``import dali_ba`` (and the CLI's --help) stays fast and loads DALI and torch only when a loader
is used.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["BatchAugmentLoader", "EvalLoader", "load_config", "DataConfig", "ConfigError", "__version__"]

_LAZY = {
    "BatchAugmentLoader": "dali_ba.loader",
    "EvalLoader": "dali_ba.loader",
    "load_config": "dali_ba.config",
    "DataConfig": "dali_ba.config",
    "ConfigError": "dali_ba.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dali_ba' has no attribute {name!r}")
