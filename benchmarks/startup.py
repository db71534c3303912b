"""Start-up at scale: seconds from creating a loader to its first batch, by the number of files.

    PYTHONPATH=. python -m benchmarks.startup --work /tmp/startup --files 10000,100000 --list 1281167 \
        [--ranks 2] [--json benchmarks/results/startup-....json]

For each size it makes an ImageFolder of tiny JPEGs (1,000 classes; the files beyond the first
thousand are hard links, so the tree costs directory entries, not data) or, with ``--list``, a
file list of that many entries, then measures in fresh processes (cold Python, warm page cache):
the index alone (``scan_image_folder``), and the first batch of a ``BatchAugmentLoader`` under
``torchrun --nproc_per_node=R`` with gloo, where rank 0 scans and broadcasts the index. Each
rank's time to its first batch is recorded. docs/imagenet.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 1000

PROBE = """
import json, os, sys, time
t0 = time.perf_counter()
mode, root, file_list, out = sys.argv[1:5]
file_list = None if file_list == "-" else file_list
if mode == "scan":
    from dali_ba.dataset import scan_image_folder
    n = len(scan_image_folder(root, file_list))
    result = {"files": n, "index_s": time.perf_counter() - t0}
else:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    t1 = time.perf_counter()
    from dali_ba import BatchAugmentLoader
    loader = BatchAugmentLoader(root, file_list=file_list, batch_size=32, image_size=16, augment="cifar",
                                device="cpu", num_threads=1)
    t2 = time.perf_counter()
    next(iter(loader))
    t3 = time.perf_counter()
    result = {"rank": dist.get_rank(), "files": len(loader.dataset), "loader_s": t2 - t1, "first_batch_s": t3 - t1,
              "since_start_s": t3 - t0}
    dist.destroy_process_group()
    out = out.replace(".json", f"-rank{result['rank']}.json")
with open(out, "w") as f:
    json.dump(result, f)
"""


def make_tree(root: Path, count: int) -> None:
    """``count`` JPEGs under ``root/c0000 … c0999``: one real file per class, the rest hard links to
    it (a file system allows some 65,000 links per file)."""
    from PIL import Image

    if (root / ".complete").exists() and int((root / ".complete").read_text()) == count:
        return
    for i in range(count):
        folder = root / f"c{i % CLASSES:04d}"
        path = folder / f"{i:08d}.jpg"
        if i < CLASSES:
            folder.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.new("RGB", (16, 16), (i % 250, 120, 150)).save(path, quality=90)
        elif not path.exists():
            os.link(folder / f"{i % CLASSES:08d}.jpg", path)
    (root / ".complete").write_text(str(count))


def make_list(root: Path, count: int, path: Path) -> None:
    lines = (f"c{i % CLASSES:04d}/{i:08d}.jpg {i % CLASSES}\n" for i in range(count))
    path.write_text("".join(lines))


def probe(mode: str, root: Path, file_list: Path | None, out: Path, ranks: int = 1) -> list:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [mode, str(root), str(file_list) if file_list else "-", str(out)]
    if mode == "scan":
        subprocess.run([sys.executable, "-c", PROBE, *args], check=True, env=env, timeout=3600)
        return [json.loads(out.read_text())]
    script = out.with_suffix(".py")
    script.write_text(PROBE)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                    str(script), *args], check=True, env=env, timeout=3600)
    return [json.loads(out.with_name(out.name.replace(".json", f"-rank{r}.json")).read_text()) for r in range(ranks)]


def main() -> None:
    from benchmarks.record import new_record, write_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the generated trees (deleted with --clean)")
    parser.add_argument("--files", default="10000,100000", help="ImageFolder sizes to measure")
    parser.add_argument("--list", type=int, default=1_281_167, help="entries of the file-list case (0: skip)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    record, rows = new_record("startup"), []
    cases = [(int(n), False) for n in args.files.split(",") if n] + ([(args.list, True)] if args.list else [])
    for count, listed in cases:
        root = work / f"tree-{count}"
        started = time.perf_counter()
        make_tree(root, count)
        file_list = None
        if listed:
            file_list = work / f"list-{count}.txt"
            make_list(root, count, file_list)
        made = time.perf_counter() - started
        scan = probe("scan", root, file_list, work / f"scan-{count}.json")[0]
        first = probe("first", root, file_list, work / f"first-{count}.json", args.ranks)
        row = {"files": count, "file_list": listed, "make_s": made, "index_s": scan["index_s"], "ranks": first}
        rows.append(row)
        print(f"{count:>9} {'list' if listed else 'tree'}: index {scan['index_s']:.2f} s; first batch per rank "
              + ", ".join(f"{r['first_batch_s']:.2f} s" for r in first), flush=True)
    record.update(rows=rows, ranks=args.ranks)
    if args.json:
        write_record(args.json, record)


if __name__ == "__main__":
    main()
