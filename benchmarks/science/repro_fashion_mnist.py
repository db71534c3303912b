"""Reproduce the batch-augmentation claim on Fashion-MNIST with dali-ba's own pipeline and trainer.

Runs, for each seed: M=1 (pipelines/fashion-mnist-baseline.yaml) and M=4
(pipelines/fashion-mnist-ba4.yaml) with everything else equal — same B, LR, schedule, steps per
epoch, seeds and data order — plus M=4 with shorter budgets (a fraction of the baseline's steps,
the schedule compressed to fit). Each run is a real ``python -m trainers.train`` process; runs
that already finished are skipped, so an interrupted sweep resumes where it stopped.

    python benchmarks/science/repro_fashion_mnist.py --seeds 3 --budgets 0.75,1.0 \
        --out benchmarks/results/science-fashion-mnist

(~42 minutes on 2 cores; add the 0.5 budget with ``--budgets 0.5,0.75,1.0``: ~52 minutes.)

Writes ``results.json`` (every curve), ``results.md`` (the table) and PNG plots to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
RECIPES = {1: REPO / "pipelines/fashion-mnist-baseline.yaml", 4: REPO / "pipelines/fashion-mnist-ba4.yaml"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument(
        "--budgets",
        default="0.75,1.0",
        help="M=4 step budgets, fractions of the baseline's steps (0.75: the target; add 0.5 to look further)",
    )
    p.add_argument("--evals", type=int, default=20, help="evaluations per run on the full test set")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/science-fashion-mnist"))
    p.add_argument("--data", default=str(REPO / "data/fashion-mnist"), help="from `dali-ba data fashion-mnist`")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with --threads torch/DALI threads)")
    p.add_argument("--threads", type=int, default=1, help="torch and DALI threads per run")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("overrides", nargs="*", help="extra key=value for every run (e.g. data.num_threads=1)")
    return p.parse_args(argv)


def plan(args) -> list[dict]:
    budgets = sorted({float(b) for b in args.budgets.split(",")})
    runs = []
    for seed in range(args.seeds):
        runs.append(dict(views=1, budget=1.0, seed=seed))
        runs.extend(dict(views=4, budget=b, seed=seed) for b in budgets)
    # The equal-steps pair first, then shorter budgets: an interrupted sweep keeps what matters most.
    runs.sort(key=lambda r: (-r["budget"], r["views"], r["seed"]))
    for run in runs:
        run["name"] = f"m{run['views']}-b{run['budget']:g}-s{run['seed']}"
    return runs


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """Lines by kind; a step logged twice (re-run after a resume) keeps its last line."""
    by_key: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_key[(row["kind"], row["step"])] = row
    kinds: dict[str, list[dict]] = {}
    for (kind, _), row in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        kinds.setdefault(kind, []).append(row)
    return kinds


def finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(r.get("event") == "end" for r in read_metrics(path).get("event", []))


def train(run: dict, args, run_dir: Path) -> None:
    import yaml

    recipe = yaml.safe_load(RECIPES[run["views"]].read_text())
    epochs = recipe["train"]["epochs"] * run["budget"]
    steps = int(60000 // recipe["data"]["batch_size"] * epochs)
    overrides = [
        f"data.train_root={args.data}/train",
        f"data.val_root={args.data}/val",
        f"train.seed={run['seed']}",
        f"train.epochs={epochs}",
        f"train.out_dir={run_dir}",
        "train.resume=auto",
        f"schedule.warmup_epochs={recipe['schedule']['warmup_epochs'] * run['budget']}",
        f"train.eval_every={-(-steps // args.evals)}",
        "train.checkpoint_every=250",
        f"data.num_threads={args.threads}",
        *args.overrides,
    ]
    cmd = [sys.executable, "-m", "trainers.train", "--config", str(RECIPES[run["views"]]), *overrides]
    (run_dir.parent / f"{run['name']}.cmd").write_text(" ".join(cmd) + "\n")
    with open(run_dir.parent / f"{run['name']}.log", "a") as log:
        subprocess.run(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)},
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    if not args.report_only:
        todo = [r for r in runs if not finished(out / "runs" / r["name"])]
        start = time.time()
        # Several single-threaded runs side by side use 2 cores better than one 2-thread run of a
        # model this small (and do not collapse when other work shares the machine).
        with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc="runs", unit="run") as bar:
            futures = {pool.submit(train, r, args, out / "runs" / r["name"]): r for r in todo}
            for future in as_completed(futures):
                future.result()
                bar.update(1)
                tqdm.write(f"{futures[future]['name']}: done ({time.time() - start:.0f} s into the sweep)")
    from report import write_report  # benchmarks/science/report.py

    summary = write_report(runs, out, read_metrics)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
