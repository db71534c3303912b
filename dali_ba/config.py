"""Typed, validated configuration: the ``data:`` section, and how YAML plus overrides become objects.

One YAML file describes one run (see ``pipelines/``). dali_ba owns the ``data:`` section
(:class:`DataConfig`) and the machinery that turns a file and dotted ``key=value`` overrides into a
typed, validated dataclass (:func:`load_config`); a consumer such as ``trainers/config.py`` composes
``DataConfig`` with sections of its own and passes its root dataclass as ``schema``.

YAML is read with YAML 1.2's booleans (only ``true``/``false``): values users type such as
``train.amp=off`` stay strings, while boolean fields still accept ``yes``/``no``/``on``/``off``.
Unknown keys, wrong types and bad values are :class:`ConfigError`\\ s naming the file and the key.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dali_ba.errors import ConfigError
from dali_ba.options import IMAGENET_MEAN, IMAGENET_STD, check_options
from dali_ba.options import PipelineOptions as P

__all__ = ["ConfigError", "DataConfig", "DataOnly", "check_at_least", "check_between", "check_choice", "check_finite",
           "config_from_dict", "config_to_dict", "expand_user_paths", "load_config", "parse_override", "parse_yaml",
           "save_config"]


def check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")


def check_at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # NaN too
        raise ConfigError(f"{key}: expected a value >= {low}; got {value!r}")


def check_between(key: str, value: float, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> None:
    """ConfigError unless low <= value <= high (``<`` on an open side); NaN is never in range."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        raise ConfigError(f"{key}: expected {low} {'<' if low_open else '<='} value {'<' if high_open else '<='} "
                          f"{high}; got {value!r}")


def check_finite(cfg: Any, prefix: str = "") -> None:
    """ConfigError naming the first float of a config (dataclasses, lists) that is NaN or infinite:
    YAML reads ``.nan`` and ``.inf``, and no setting means either."""
    import dataclasses
    import math

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{prefix}{f.name}.")
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{prefix}{f.name}: expected a finite number; got {value!r}")


def expand_user_paths(cfg: Any, names: Sequence[str]) -> None:
    """``~`` expanded in the path fields ``names`` of a frozen dataclass (URLs and None left alone)."""
    import os

    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, str) and value.startswith("~"):
            object.__setattr__(cfg, name, os.path.expanduser(value))


@dataclass(frozen=True)
class DataConfig:
    """The ``data:`` section: where the images are, and the loaders' options by the same names,
    defaults and checks (``dali_ba.options.PipelineOptions``; the loaders' ``from_config``)."""

    train_root: str = "data/fashion-mnist/train"  # ImageFolder root: root/<class>/<image>
    val_root: Optional[str] = None
    train_list: Optional[str] = None  # file list ("relative/path label" lines) under train_root
    train_split: str = "train"  # packed datasets (dali-ba data pack): the split each loader reads
    val_split: str = "val"
    batch_size: int = P.batch_size  # B: unique images per step per rank
    global_batch_size: int = 0  # > 0: unique images per step over all ranks (B = this / world size)
    num_views: int = 4  # M: augmented views of each image in the same batch
    image_size: int = P.image_size
    augment: str = P.augment
    min_area: float = P.min_area
    pad: int = P.pad
    color_jitter: float = P.color_jitter
    trivial_augment: bool = P.trivial_augment
    rand_augment: Optional[List[int]] = None  # [N, M], e.g. [2, 9]; empty or null: off
    auto_augment: bool = P.auto_augment
    cutout: int = P.cutout
    cutout_holes: int = P.cutout_holes
    random_erase: float = P.random_erase
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    dtype: str = P.dtype
    device: str = P.device
    decode_device: str = P.decode_device
    num_threads: int = P.num_threads  # per rank
    prefetch: int = P.prefetch
    hw_decoder_load: float = P.hw_decoder_load
    preallocate_width_hint: int = P.preallocate_width_hint
    preallocate_height_hint: int = P.preallocate_height_hint
    packed_shuffle: str = P.packed_shuffle
    shuffle_buffer: int = P.shuffle_buffer

    def __post_init__(self) -> None:
        expand_user_paths(self, ("train_root", "val_root", "train_list"))
        check_options(self, prefix="data.")


@dataclass(frozen=True)
class DataOnly:
    """The default schema of :func:`load_config`: the ``data:`` section; other sections belong to
    whoever consumes the data (a trainer) and are left to its own schema."""

    data: DataConfig = field(default_factory=DataConfig)


# -- YAML with YAML 1.2 booleans ------------------------------------------------------------------

class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2 scalars: only true/false are booleans (so ``off``, ``on``,
    ``yes``, ``no`` stay strings) and ``1e-4`` is a float. Aliases and duplicate keys are refused."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError("while reading the config", None,
                                       "YAML aliases (*name) are not supported", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.MarkedYAMLError("while reading a mapping", node.start_mark,
                                           f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text → Python values, with YAML 1.2 booleans and floats (see ``_Yaml12Loader``)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in" in first_line and key:
        return f"{key}: unknown key (check the spelling; the keys are listed in the README's configuration table)"
    return f"{key}: {first_line}" if key else first_line


def parse_override(item: str) -> dict:
    """``"a.b=value"`` → ``{"a": {"b": value}}``, the value read as YAML (``[1, 2]``, ``off``, ``1e-4``)."""
    key, sep, text = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise ConfigError(f"override {item!r}: expected key=value (e.g. data.num_views=2)")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def config_from_dict(values: dict, overrides: Sequence[str] = (), source: str = "<dict>", schema: type = DataOnly):
    """A validated ``schema`` instance from nested ``values`` plus dotted ``key=value`` overrides,
    applied in order (the last word wins). With the default schema only ``data:`` is read."""
    values = dict(values or {})
    parsed = [(item, parse_override(item)) for item in overrides]
    if schema is DataOnly:
        values = {"data": values.get("data") or {}}
        parsed = [(item, o) for item, o in parsed if "data" in o]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(values))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    for item, override in parsed:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(override))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {_describe(exc)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
        check_finite(cfg)
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def load_config(path: str | Path, overrides: Sequence[str] = (), schema: type = DataOnly):
    """Load ``path`` (YAML), apply ``overrides`` (``["data.num_views=2", ...]``) and validate.

    Returns a ``schema`` instance: by default :class:`DataOnly` (``cfg.data`` is a DataConfig);
    the trainer passes its own root (``trainers.config.Config``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = parse_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML: {detail}") from None
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, ...); got {type(values).__name__}")
    return config_from_dict(values or {}, overrides, source=str(path), schema=schema)


def config_to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so a run's results carry their recipe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
