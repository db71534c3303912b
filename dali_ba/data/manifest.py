"""``dataset.json``: the manifest of a packed dataset, the one file a loader reads to find its shards.

One folder (or ``s3://`` prefix) holds the shards of several splits and one manifest::

    {
      "format": "dali-ba-webdataset", "format_version": 1,
      "classes": ["n01440764", ...],          # sorted class names, index = label, shared by all splits
      "splits": {
        "train": {
          "num_samples": 1281167,
          "extensions": ["jpg", "cls"],        # per sample: <key>.jpg (image bytes), <key>.cls (label, ASCII)
          "shards": [{"file": "train-000000.tar", "index": "train-000000.idx",
                      "samples": 2380, "bytes": 255993856, "sha256": "..."}, ...],
          "skipped": [{"path": "n01440764/x.JPEG", "reason": "..."}],   # source files left out
          "source": {"root": "/data/imagenet/train", "file_list": null},
          "options": {"shard_size": 256000000, "max_side": null, "quality": 90,
                      "shuffle_seed": 0, "max_pixels": 100000000},
          "created": "2026-12-02T07:00:00+00:00", "dali_ba_version": "0.1.0", "git_commit": "..."
        },
        "val": {...}
      }
    }

File names are relative to the manifest's folder. Packing a split replaces only that split's entry, so
``train`` and ``val`` can be packed by separate runs into one folder; their labels must mean the same,
so a split's classes must be those already in the manifest or a subset of them (its labels are then
mapped to the manifest's order), unless no other split is there.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from dali_ba.errors import UserError

MANIFEST_NAME = "dataset.json"
FORMAT = "dali-ba-webdataset"
FORMAT_VERSION = 1


def shard_names(split: str, number: int) -> tuple[str, str]:
    """(tar name, index name) of shard ``number`` of ``split``."""
    return f"{split}-{number:06d}.tar", f"{split}-{number:06d}.idx"


def empty() -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "classes": [], "splits": {}}


def parse(data: bytes | None, where: str) -> dict[str, Any]:
    """The manifest in ``data`` (an empty one for None); UserError naming ``where`` if it is not ours."""
    if data is None:
        return empty()
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: not a valid JSON manifest ({exc}); remove it or choose another OUT") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{where}: not a dali-ba packed-dataset manifest; remove it or choose another OUT")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{where}: manifest format version {manifest.get('format_version')!r} is not "
                        f"{FORMAT_VERSION}; this dali-ba cannot read it")
    manifest.setdefault("splits", {})
    manifest.setdefault("classes", [])
    return manifest


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def align_classes(manifest: dict[str, Any], split: str, classes: Sequence[str], where: str) -> list[int]:
    """Label map for a split with ``classes``: ``new_label = mapping[old_label]``.

    With no other split in the manifest the split's classes become the manifest's (identity map);
    otherwise they must be the manifest's classes or a subset of them (UserError naming the classes).
    """
    others = [name for name in manifest["splits"] if name != split]
    if not others or list(classes) == list(manifest["classes"]):
        return list(range(len(classes)))
    known = {name: i for i, name in enumerate(manifest["classes"])}
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise UserError(f"{where}: classes {unknown[:5]}{' …' if len(unknown) > 5 else ''} are not among the "
                        f"{len(known)} classes of split(s) {', '.join(others)} already packed there; labels "
                        f"would disagree (pack into another OUT, or repack the other splits)")
    return [known[c] for c in classes]


def with_split(manifest: dict[str, Any], split: str, entry: dict[str, Any], classes: Sequence[str]) -> dict:
    """A copy of ``manifest`` whose ``split`` is ``entry``; ``classes`` become the shared classes when
    no other split is there (align_classes has checked them otherwise)."""
    out = dict(manifest)
    out["splits"] = dict(manifest["splits"])
    out["splits"][split] = entry
    if len(out["splits"]) == 1:
        out["classes"] = list(classes)
    return out


def shard_urls(root: str, manifest: dict[str, Any], split: str) -> tuple[list[str], list[str]]:
    """(tar paths, index paths) of ``split`` under ``root`` (a folder or an ``s3://`` prefix), for
    ``fn.readers.webdataset(paths=..., index_paths=...)``."""
    if split not in manifest["splits"]:
        raise UserError(f"{root}: no split {split!r} in {MANIFEST_NAME} (has: {', '.join(manifest['splits'])})")
    base = root.rstrip("/")
    shards = manifest["splits"][split]["shards"]
    return [f"{base}/{s['file']}" for s in shards], [f"{base}/{s['index']}" for s in shards]


def load(root: str) -> dict[str, Any]:
    """The manifest of the packed dataset at ``root`` (a folder or an ``s3://`` prefix)."""
    from dali_ba import storage

    where = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    data = storage.read_bytes(where)
    if data is None:
        raise UserError(f"{where}: not found (not a packed dataset: see `dali-ba data pack`)")
    return parse(data, where)
