"""``dali-ba data synth``: ImageNet-like synthetic JPEGs in ImageFolder layout.

Each image is a smooth colour gradient, a few filled ellipses/rectangles and sensor-like noise,
at ImageNet-like sizes (width 350..650, height/width 0.5..1.1, ~500x375 on average), as JPEG.
The class sets the dominant shape colour, the shape kind and the gradient direction, so a
classifier can learn something; everything else is random. Output is deterministic for a seed:
every image draws from its own ``SeedSequence([seed, split, index])``, independent of worker count.
"""
from __future__ import annotations

import argparse
import colorsys
import os
import shutil
from pathlib import Path

import numpy as np

from dali_ba.errors import UserError

_SPLITS = {"train": 0, "val": 1}


def _class_name(label: int) -> str:
    return f"class_{label:03d}"


def _class_style(label: int, classes: int) -> tuple[np.ndarray, int, float]:
    """(RGB colour in 0..1, shape kind 0=ellipse 1=rectangle, gradient angle) for one class."""
    hue = (label / max(classes, 1)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95), dtype=np.float32)
    return colour, label % 2, (label * 2.399963) % (2 * np.pi)  # golden angle: spread directions


def render_image(label: int, classes: int, rng: np.random.Generator,
                 mean_size: tuple[int, int] = (500, 375)) -> np.ndarray:
    """One HxWx3 uint8 image for ``label``; sizes vary around ``mean_size`` (width, height)."""
    from PIL import Image

    mean_w, mean_h = mean_size
    width = int(rng.integers(int(mean_w * 0.7), int(mean_w * 1.3) + 1))
    # height / width: log-uniform around the mean aspect, from wide landscape to mild portrait
    aspect = (mean_h / mean_w) * float(np.exp(rng.uniform(-0.4, 0.4)))
    height = max(16, int(round(width * aspect)))
    colour, kind, angle = _class_style(label, classes)

    # Draw at half resolution and upscale with PIL: 4x less numpy work, and the bilinear
    # upscale gives soft, photo-like edges instead of aliased ones.
    h2, w2 = (height + 1) // 2, (width + 1) // 2
    ys = np.linspace(0.0, 1.0, h2, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, w2, dtype=np.float32)[None, :]
    # Background: a linear gradient between two random colours, direction set by the class.
    angle += float(rng.normal(0.0, 0.3))
    t = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0.05, 0.6, size=(2, 3)).astype(np.float32)
    img = c0 + t[..., None] * (c1 - c0)

    # Foreground: 2..5 shapes, mostly in the class colour (jittered), some distractors.
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0.1, 0.9, size=2)
        rx, ry = rng.uniform(0.05, 0.3, size=2)
        # Only touch the shape's bounding box: full-image boolean masks dominated the cost.
        x0, x1 = max(0, int((cx - rx) * w2)), min(w2, int((cx + rx) * w2) + 1)
        y0, y1 = max(0, int((cy - ry) * h2)), min(h2, int((cy + ry) * h2) + 1)
        sx, sy = xs[:, x0:x1], ys[y0:y1]
        if kind == 0:
            mask = ((sx - cx) / rx) ** 2 + ((sy - cy) / ry) ** 2 <= 1.0
        else:
            mask = (np.abs(sx - cx) <= rx) & (np.abs(sy - cy) <= ry)
        fill = colour if rng.random() < 0.75 else rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        fill = np.clip(fill + rng.normal(0.0, 0.08, size=3), 0.0, 1.0).astype(np.float32)
        img[y0:y1, x0:x1][mask] = fill
    img += rng.standard_normal((h2, w2, 1), dtype=np.float32) * np.float32(rng.uniform(0.01, 0.06))
    small = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _write_one(task: tuple[int, int, int, int, int, str, int, tuple[int, int]]) -> None:
    from PIL import Image

    seed, split, index, label, classes, path, quality, mean_size = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, index]))
    Image.fromarray(render_image(label, classes, rng, mean_size)).save(path, quality=quality)


def make_synthetic_imagefolder(out: str | os.PathLike, images: int, classes: int,
                               val_images: int = 0, seed: int = 0, quality: int = 90,
                               mean_size: tuple[int, int] = (500, 375), overwrite: bool = False,
                               workers: int | None = None, progress: bool = True) -> Path:
    """Write ``out/train/class_XXX/NNNNNN.jpg`` (and ``out/val/...`` when ``val_images > 0``).

    Image ``i`` of a split belongs to class ``i % classes``, so classes are balanced and none
    is empty. Returns ``out`` as a Path. Raises UserError on bad arguments or a non-empty target.
    """
    from tqdm import tqdm

    out = Path(out)
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if classes < 1:
        raise UserError(f"--classes must be >= 1, got {classes}")
    if images < classes:
        raise UserError(f"--images ({images}) must be >= --classes ({classes}): "
                        "every class folder needs at least one image")
    if val_images and val_images < classes:
        raise UserError(f"--val-images ({val_images}) must be 0 or >= --classes ({classes})")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {quality}")
    counts = {"train": images, "val": val_images}
    for split in counts:
        target = out / split
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise UserError(f"{target} already exists and is not empty "
                                "(choose another OUT, delete it, or pass --overwrite)")
            shutil.rmtree(target)

    tasks = []
    for split, count in counts.items():
        for label in range(classes if count else 0):
            (out / split / _class_name(label)).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = i % classes
            path = out / split / _class_name(label) / f"{i:06d}.jpg"
            tasks.append((seed, _SPLITS[split], i, label, classes, str(path), quality,
                          tuple(mean_size)))

    workers = workers or min(len(tasks) // 64 + 1, os.cpu_count() or 1)
    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=None if progress else True)
    if workers <= 1:
        for task in tasks:
            _write_one(task)
            bar.update()
    else:
        import multiprocessing as mp

        # fork is cheap and the workers need nothing but numpy/PIL; spawn elsewhere.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, tasks, chunksize=16):
                bar.update()
    bar.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dali_ba.dataset import expand_path

    parser.add_argument("out", type=expand_path, help="output folder (gets train/ and, with --val-images, val/)")
    parser.add_argument("--images", type=int, required=True, help="training images in total")
    parser.add_argument("--classes", type=int, required=True, help="number of class folders")
    parser.add_argument("--val-images", type=int, default=0, help="validation images (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="output is identical for a seed")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing OUT/train and OUT/val")


def run(args: argparse.Namespace) -> int:
    from dali_ba.outputs import check_output_dir

    check_output_dir(args.out, "OUT")
    out = make_synthetic_imagefolder(args.out, args.images, args.classes,
                                     val_images=args.val_images, seed=args.seed,
                                     quality=args.quality, overwrite=args.overwrite)
    where = f"{out / 'train'}" + (f" and {out / 'val'}" if args.val_images else "")
    print(f"wrote {args.images} training + {args.val_images} validation JPEGs "
          f"in {args.classes} classes to {where}")
    return 0
