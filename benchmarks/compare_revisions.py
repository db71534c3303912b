"""The loader at two git revisions, side by side: interleaved runs, medians and their ratio.

    .venv/bin/python benchmarks/compare_revisions.py REV_A REV_B --root data/synth2k/train \
        [--views 4] [--rounds 5] [--batches 26] [--json out.json]

A research script for changes inside the loader, where ``dali-ba bench`` cannot put the old and the
new code in one process. ``--epoch-images N`` reads N images only (a file list), so the timed batches
cross epoch boundaries. Each revision is checked out once into a
temporary ``git worktree``; every round runs one fresh process per revision (order alternating),
which builds ``BatchAugmentLoader(root, batch_size=64, num_views=M, device="cpu", num_threads=2)``
from that checkout, discards 3 batches, then times ``--batches`` batches: images/s and CPU
seconds per image of the process (DALI's threads included). Reported: per-revision medians and
B ÷ A.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import dali_ba
from dali_ba.loader import BatchAugmentLoader
root, views, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
file_list = sys.argv[4] if len(sys.argv) > 4 else None
loader = BatchAugmentLoader(root, batch_size=64, num_views=views, device="cpu", num_threads=2, file_list=file_list)

def endless():  # epoch after epoch, as training does
    while True:
        yield from loader

it = endless()
for _ in range(3):
    next(it)
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
c0, t0 = cpu(), time.perf_counter()
for _ in range(batches):
    images, labels = next(it)
c1, t1 = cpu(), time.perf_counter()
n = batches * loader.batch_size
print(json.dumps({"images_per_s": n / (t1 - t0), "cpu_ms_per_image": (c1 - c0) / n * 1e3, "module": dali_ba.__file__}))
"""


def _run(checkout: Path, root: str, views: int, batches: int, file_list: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    extra = [file_list] if file_list else []
    out = subprocess.run([sys.executable, "-c", CHILD, root, str(views), str(batches), *extra], cwd=checkout, env=env,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["module"].startswith(str(checkout)), result["module"]  # really that revision's code
    return result


def _subset(root: str, count: int) -> str:
    """A file list of ``count`` evenly spaced images of ``root`` (ImageFolder), for short epochs."""
    files = sorted(Path(root).rglob("*.jpg"))
    classes = sorted({f.parent.name for f in files})
    step = max(1, len(files) // count)
    listing = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    with listing:
        for f in files[::step][:count]:
            listing.write(f"{f.relative_to(root)} {classes.index(f.parent.name)}\n")
    return listing.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("--root", required=True)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=26)
    ap.add_argument("--epoch-images", type=int, default=0,
                    help="read only this many images (a file list): short epochs, so epoch boundaries count")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = str(Path(args.root).resolve())
    file_list = _subset(root, args.epoch_images) if args.epoch_images else None
    with tempfile.TemporaryDirectory() as tmp:
        checkouts = {}
        for rev in (args.rev_a, args.rev_b):
            path = Path(tmp) / f"rev{len(checkouts)}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
            checkouts[rev] = path
        try:
            runs = {rev: [] for rev in checkouts}
            for r in range(args.rounds):
                order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
                for rev in order:
                    runs[rev].append(_run(checkouts[rev], root, args.views, args.batches, file_list))
                    last = runs[rev][-1]
                    print(f"round {r + 1}/{args.rounds} {rev}: {last['images_per_s']:.1f} img/s, "
                          f"{last['cpu_ms_per_image']:.2f} CPU ms/img", flush=True)
        finally:
            for path in checkouts.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
    med = {rev: {k: statistics.median(x[k] for x in xs) for k in ("images_per_s", "cpu_ms_per_image")}
           for rev, xs in runs.items()}
    a, b = med[args.rev_a], med[args.rev_b]
    print("| revision | images/s | CPU ms / image |\n|---|---:|---:|")
    for rev in (args.rev_a, args.rev_b):
        print(f"| {rev} | {med[rev]['images_per_s']:.1f} | {med[rev]['cpu_ms_per_image']:.2f} |")
    print(f"B ÷ A: {b['images_per_s'] / a['images_per_s']:.3f}× images/s, "
          f"A ÷ B: {a['cpu_ms_per_image'] / b['cpu_ms_per_image']:.3f}× CPU per image")
    if args.json:
        from dali_ba.provenance import git_commit

        revisions = {rev: subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True,
                                         check=True).stdout.strip() for rev in checkouts}
        record = {"command": " ".join(sys.argv), "revisions": revisions, **git_commit(), "views": args.views,
                  "batches": args.batches, "epoch_images": args.epoch_images, "medians": med, "runs": runs}
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
