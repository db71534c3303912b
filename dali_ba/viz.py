"""``dali-ba show``: a PNG grid, one row per image and its M augmented views in the columns.

Views come from the real train pipeline with mean 0 / std 1, so the pixels are what the network
would see before normalisation. Column 0 is the eval view of the same image, for reference.
Every per-view option of the loaders can be drawn (``--cutout 16``, ``--rand-augment 2,9``, …): each
column is its own draw. Cutout holes and erased rectangles are filled with 0 after normalisation,
the mean colour in training; with mean 0 / std 1 here they show black.
"""
from __future__ import annotations

import argparse

import numpy as np

from dali_ba.options import AUGMENT_RECIPES

LABEL_WIDTH = 110
GAP = 4


def _pair(text: str) -> list:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,M (two integers), got {text!r}") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected N,M (two integers), got {text!r}")
    return values


OPTIONS = ("color_jitter", "trivial_augment", "rand_augment", "auto_augment", "cutout", "cutout_holes",
           "random_erase")  # the per-view options `show` draws (the loaders' names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dali_ba.dataset import expand_path

    parser.add_argument("--root", required=True, type=expand_path, help="ImageFolder root (root/<class>/<image>)")
    parser.add_argument("--views", type=int, default=4, help="M: views per image (columns)")
    parser.add_argument("--images", type=int, default=8, help="images (rows)")
    parser.add_argument("--augment", default="imagenet", choices=AUGMENT_RECIPES)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--pad", type=int, default=4, help="cifar recipe padding")
    parser.add_argument("--color-jitter", type=float, default=0.0)
    parser.add_argument("--trivial-augment", action="store_true", help="TrivialAugment-Wide per view")
    parser.add_argument("--rand-augment", type=_pair, default=None, metavar="N,M",
                        help="RandAugment per view: N operations of magnitude M (e.g. 2,9)")
    parser.add_argument("--auto-augment", action="store_true", help="AutoAugment (ImageNet policy) per view")
    parser.add_argument("--cutout", type=int, default=0, help="Cutout hole side in pixels (0: off)")
    parser.add_argument("--cutout-holes", type=int, default=1, help="Cutout holes per view")
    parser.add_argument("--random-erase", type=float, default=0.0, help="random erasing probability per view")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=0, help="upscale factor for small images (0: auto)")
    parser.add_argument("--out", default="views.png", type=expand_path, help="PNG file to write")


def render_grid(root: str, views: int, images: int, augment: str, image_size: int, seed: int = 0,
                scale: int = 0, **options) -> "PIL.Image.Image":  # noqa: F821
    """Build the grid image (rows: images; columns: eval view, then the M train views)."""
    from PIL import Image, ImageDraw

    from dali_ba.loader import BatchAugmentLoader, EvalLoader

    plain = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device="cpu", num_threads=2, shard_id=0, num_shards=1)
    loader = BatchAugmentLoader(root, batch_size=images, num_views=views, image_size=image_size, augment=augment,
                                seed=seed, layout="grouped", **plain, **options)
    batch, labels = next(iter(loader))  # [N, M, C, H, W]
    # The same files in the same order through the eval transform: the reference column.
    chosen = loader.batch_indices(0, 0)
    eval_loader = EvalLoader(root, batch_size=images, image_size=image_size, augment=augment, indices=chosen,
                             **plain)
    reference, _ = next(iter(eval_loader))
    files = [loader.dataset.files[i] for i in chosen]

    scale = scale or max(1, 96 // image_size)
    cell = image_size * scale
    width = LABEL_WIDTH + (views + 1) * (cell + GAP)
    grid = Image.new("RGB", (width, len(files) * (cell + GAP) + 20), "white")
    draw = ImageDraw.Draw(grid)
    shown = ", ".join(f"{k} {v}" for k, v in options.items() if v and k in OPTIONS and k != "cutout_holes")
    draw.text((4, 4), f"{augment}: eval view | {views} train views" + (f" ({shown})" if shown else ""), fill="black")
    for row in range(len(files)):
        y = 20 + row * (cell + GAP)
        draw.text((4, y + cell // 2 - 6), loader.classes[int(labels[row])][:16], fill="black")
        columns = [reference[row]] + [batch[row, v] for v in range(views)]
        for col, tensor in enumerate(columns):
            pixels = (tensor.permute(1, 2, 0).float().clamp(0, 1).numpy() * 255).astype(np.uint8)
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (LABEL_WIDTH + col * (cell + GAP), y))
    return grid


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from dali_ba.dataset import check_dataset_paths
    from dali_ba.errors import UserError
    from dali_ba.outputs import check_output_file, inside

    if args.views < 1 or args.images < 1:
        raise UserError(f"--views and --images must be >= 1; got {args.views} and {args.images}")
    if args.scale < 0:
        raise UserError(f"--scale: expected 0 (automatic) or a factor >= 1; got {args.scale}")
    check_dataset_paths(args.root)
    if inside(args.out, args.root):  # a PNG in a class folder would be trained on as an image of that class
        raise UserError(f"--out {args.out}: inside --root {args.root}; write the grid elsewhere")
    savable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    out = check_output_file(args.out, "--out", suffixes=savable)
    grid = render_grid(args.root, args.views, args.images, args.augment, args.image_size, args.seed, args.scale,
                       pad=args.pad, **{name: getattr(args, name) for name in OPTIONS})
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        grid.save(out)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    print(f"view grid ({args.images} images × {args.views} views, {args.augment}): {out.resolve()}")
    return 0
