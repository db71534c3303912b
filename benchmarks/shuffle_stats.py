"""How random is the order a loader reads? Loose files (an exact global permutation per epoch) against
a packed dataset's two shuffles (``buffer`` with its default size, ``global``).

    PYTHONPATH=. python -m benchmarks.shuffle_stats --work /tmp/shuffle [--images 20000] [--classes 100] \
        [--json benchmarks/results/shuffle-....json]

Tiny JPEGs whose grey level encodes their index are written, packed (``dali-ba data pack``, its
default seeded write order, ~200 shards), and read for 3 epochs by rank 0 of 2 at batch 64, M=1.
Measured on the stream of labels and positions:

- ``adjacent_same_label``: the fraction of consecutive images with the same label (i.i.d. draws:
  about 1/classes);
- ``classes_per_batch``: distinct labels in a batch of 64 (uniform draws: 100·(1-(1-1/100)^64) ≈ 47.4);
- ``epoch_rank_correlation``: Spearman correlation between the positions of the images two consecutive
  epochs share (an independent reshuffle: about 0);
- ``shared_between_epochs``: the fraction of a rank's images of one epoch it reads again in the next
  (an exact permutation dealt to 2 ranks: about 1/2).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, images: int, classes: int) -> None:
    from PIL import Image

    if (root / ".complete").exists():
        return
    for i in range(images):
        folder = root / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = [(i >> shift) & 255 for shift in (0, 8, 16)]  # the index in the three channels
        Image.new("RGB", (8, 8), tuple(grey)).save(folder / f"{i:06d}.png")
    (root / ".complete").write_text("")


def decode_index(image) -> int:
    """The index a ``make_images`` PNG holds (mean 0 / std 1 output, CHW)."""
    r, g, b = (int(round(float(image[c].mean()) * 255)) for c in range(3))
    return r + (g << 8) + (b << 16)


def stream(root: str, epochs: int, **options) -> list:
    from dali_ba import BatchAugmentLoader

    loader = BatchAugmentLoader(root, batch_size=64, num_views=1, image_size=8, augment="cifar", pad=0,
                                mean=(0, 0, 0), std=(1, 1, 1), device="cpu", num_threads=2, shard_id=0, num_shards=2,
                                seed=1, **options)
    return [[decode_index(x) for images, _ in loader for x in images] for _ in range(epochs)]


def stats(epochs: list, classes: int) -> dict:
    labels = [np.asarray(e) % classes for e in epochs]
    same = float(np.mean([np.mean(x[1:] == x[:-1]) for x in labels]))
    per_batch = float(np.mean([len(set(x[i:i + 64])) for x in labels for i in range(0, len(x) - 63, 64)]))
    correlations, shared = [], []
    for a, b in zip(epochs, epochs[1:]):
        common = sorted(set(a) & set(b))
        shared.append(len(common) / len(a))
        pa = {v: i for i, v in enumerate(a)}
        pb = {v: i for i, v in enumerate(b)}
        ra = np.argsort(np.argsort([pa[v] for v in common]))
        rb = np.argsort(np.argsort([pb[v] for v in common]))
        correlations.append(float(np.corrcoef(ra, rb)[0, 1]) if len(common) > 2 else float("nan"))
    return {"adjacent_same_label": same, "classes_per_batch": per_batch,
            "epoch_rank_correlation": float(np.mean(correlations)), "shared_between_epochs": float(np.mean(shared))}


def main() -> None:
    from benchmarks.record import new_record, write_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    loose, packed = work / "loose", work / "packed"
    make_images(loose, args.images, args.classes)
    if not (packed / "dataset.json").exists():
        subprocess.run([sys.executable, "-m", "dali_ba.cli", "data", "pack", str(loose), str(packed),
                        "--shard-size", str(max(1, args.images // 200) * 1200)], check=True)
    record = new_record("shuffle")
    rows = {}
    for name, root, options in (("loose", loose, {}), ("packed buffer", packed, {}),
                                ("packed global", packed, {"packed_shuffle": "global"})):
        rows[name] = stats(stream(str(root), 3, **options), args.classes)
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    record.update(images=args.images, classes=args.classes, results=rows)
    if args.json:
        write_record(args.json, record)


if __name__ == "__main__":
    main()
