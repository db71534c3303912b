"""Every user error is one line and exit 2, before any work, in every entry point.

Real processes: `python -m trainers.train`, `dali-ba train` (also with --nproc 2, whose check runs
before torchrun), `show`, `bench`, `data synth|verify|pack|fashion-mnist`, with values out of range,
output paths that are files, folders, read-only or on a full disk (a real tmpfs in a private mount
namespace, `unshare -m`), and the training data's own mistakes. Each case asserts exit status 2,
exactly one line on stderr that names the culprit, no traceback, and that nothing was written.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import tiny, write_image_folder, write_yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
PY = sys.executable
TRAIN = [PY, "-m", "trainers.train"]
CLI = [PY, "-m", "dali_ba.cli"]


def one_line_exit_2(cases: dict, cwd: Path = REPO, workers: int = 3) -> None:
    """Run every ``name: (command, expected text)``; each must fail with one line naming it."""
    def attempt(item):
        name, (command, expected) = item
        done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
        return name, expected, done

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(attempt, cases.items()))
    for name, expected, done in results:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, (name, done.returncode, done.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in done.stderr, (name, done.stderr[-2000:])
        assert "error:" in lines[0] and expected in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def base(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("args")
    return write_yaml(tiny(data, folder / "out"), folder / "base.yaml")


def test_values_out_of_range_and_schedules_that_make_no_sense(base, data, tmp_path):
    cfg = str(base)
    t = [*TRAIN, "--config", cfg]
    cases = {
        "seed too large for numpy": ([*t, "train.seed=4294967296"], "train.seed"),
        "epochs inf": ([*t, "train.epochs=.inf"], "train.epochs: expected a finite number"),
        "epochs nan": ([*t, "train.epochs=.nan"], "train.epochs"),
        "lr nan": ([*t, "optim.lr=.nan"], "optim.lr"),
        "lr 0": ([*t, "optim.lr=0"], "optim.lr: expected a value > 0"),
        "momentum 1.5": ([*t, "optim.momentum=1.5"], "optim.momentum"),
        "gamma above 1": ([*t, "schedule.kind=step", "schedule.gamma=5"], "schedule.gamma"),
        "milestone before the start": ([*t, "schedule.kind=step", "schedule.milestones=[-1]"], "schedule.milestones"),
        "min_lr above lr": ([*t, "schedule.min_lr=0.5"], "schedule.min_lr: 0.5 is above optim.lr=0.2"),
        "min_lr with a step schedule": ([*t, "schedule.kind=step", "schedule.min_lr=0.01"], "schedule.min_lr"),
        "warmup longer than the run": ([*t, "schedule.warmup_epochs=5"], "schedule.warmup_epochs"),
        "legw warmup longer than the run": ([*t, "schedule.warmup=legw", "schedule.warmup_epochs=1",
                                              "optim.reference_batch=1"], "the warmup takes 64 steps"),
        "min_lr above the scaled peak": ([*t, "schedule.min_lr=0.15", "optim.lr_scaling=linear",
                                           "optim.reference_batch=16"], "above the peak LR 0.1"),
        "mean nan": ([*t, "data.mean=[.nan,0,0]"], "data.mean: expected a finite number"),
        "threads DALI cannot start": ([*t, "data.num_threads=100000"], "data.num_threads: expected a value <= 1024"),
        "prefetch": ([*t, "data.prefetch=100000"], "data.prefetch"),
        "timeout timedelta cannot hold": ([*t, "train.dist_timeout_s=99999999999999"], "train.dist_timeout_s"),
        "nonfinite limit": ([*t, "train.nonfinite_limit=-1"], "train.nonfinite_limit"),
        "batch larger than memory": ([*t, "data.image_size=100000"], "train.view_chunks"),
        "model larger than memory": ([*t, "model.num_classes=100000000000"], "out of memory"),
        "--resume against train.resume": ([*t, "train.resume=none", "--resume", "auto"], "contradict each other"),
        "usage: no --config": ([*TRAIN, "data.num_views=2"], "the following arguments are required: --config"),
        "override without = after an option": ([*TRAIN, "data.num_views=2", "--config", cfg, "data.num_views"],
                                               "expected key=value"),
        "dali-ba: seed under --nproc 2": ([*CLI, "train", "--config", cfg, "--nproc", "2", "train.seed=-1"],
                                          "train.seed"),
        "dali-ba: --nproc 0": ([*CLI, "train", "--config", cfg, "--nproc", "0"], "--nproc"),
        "dali-ba: --nproc 100000": ([*CLI, "train", "--config", cfg, "--nproc", "100000"], "--nproc"),
        "dali-ba: unknown command": ([*CLI, "trian"], "invalid choice"),
    }
    one_line_exit_2(cases)
    assert not (base.parent / "out").exists()  # nothing was started


def test_output_paths_that_cannot_be_written(base, data, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "a_dir").mkdir()
    train = str(data / "train")
    cfg = str(base)
    t = [*TRAIN, "--config", cfg]
    bench = [*CLI, "bench", "loader", "--root", train, "--views", "1", "--variants", "dali-fused",
             "--batch-size", "8", "--repeats", "1", "--batches", "1"]
    cases = {
        "out_dir is a file": ([*t, f"train.out_dir={a_file}"], "exists and is not a folder"),
        "out_dir under a file": ([*t, f"train.out_dir={a_file}/run"], "is a file, not a folder"),
        "out_dir where nothing can be written": ([*t, "train.out_dir=/proc/run"], "cannot write in /proc"),
        "out_dir inside the training images": ([*t, f"train.out_dir={train}/runs"], "inside data.train_root"),
        "out_dir empty": ([*t, "train.out_dir= "], "train.out_dir"),
        "dali-ba train --nproc 2: out_dir is a file": ([*CLI, "train", "--config", cfg, "--nproc", "2",
                                                        f"train.out_dir={a_file}"], "exists and is not a folder"),
        "show --out a folder": ([*CLI, "show", "--root", train, "--out", str(tmp_path / "a_dir")], "is a folder"),
        "show --out under a file": ([*CLI, "show", "--root", train, "--out", f"{a_file}/g.png"], "is a file"),
        "show --out not an image name": ([*CLI, "show", "--root", train, "--out", str(tmp_path / "g.txt")],
                                         "expected a file name ending in"),
        "show --out into the training images": ([*CLI, "show", "--root", train, "--out", f"{train}/class_0/g.png"],
                                                "inside --root"),
        "show --scale": ([*CLI, "show", "--root", train, "--scale", "-2", "--out", str(tmp_path / "g.png")],
                         "--scale"),
        "synth OUT a file": ([*CLI, "data", "synth", str(a_file), "--images", "4", "--classes", "2"],
                             "exists and is not a folder"),
        "synth OUT under /proc": ([*CLI, "data", "synth", "/proc/s", "--images", "4", "--classes", "2"],
                                  "cannot write in /proc"),
        "synth --seed": ([*CLI, "data", "synth", str(tmp_path / "s"), "--images", "4", "--classes", "2",
                          "--seed", "-1"], "--seed"),
        "verify clean list under a file": ([*CLI, "data", "verify", train, "--write-clean-list", f"{a_file}/c.txt"],
                                           "is a file"),
        "verify --max-pixels nan": ([*CLI, "data", "verify", train, "--max-pixels", "nan"], "--max-pixels"),
        "pack --shuffle-seed": ([*CLI, "data", "pack", train, str(tmp_path / "p"), "--shuffle-seed", "-1"],
                                "--shuffle-seed"),
        "pack --max-pixels nan": ([*CLI, "data", "pack", train, str(tmp_path / "p"), "--max-pixels", "nan"],
                                  "--max-pixels"),
        "fashion-mnist OUT a file": ([*CLI, "data", "fashion-mnist", str(a_file)], "exists and is not a folder"),
        "bench --json under a file": ([*bench, "--json", f"{a_file}/r.json"], "is a file"),
        "bench --json where nothing can be written": ([*bench, "--json", "/proc/r.json"], "cannot write in /proc"),
        "bench --plot not a plot format": ([*bench, "--plot", str(tmp_path / "p.txt")], "expected a file name"),
        "bench --plot into the training images": ([*bench, "--plot", f"{train}/class_0/p.png"], "inside --root"),
        "bench --warmup": ([*bench, "--warmup", "-5"], "--warmup"),
        "bench --min-seconds nan": ([*bench, "--min-seconds", "nan"], "--min-seconds"),
        "bench --seed": ([*bench, "--seed", "-1"], "--seed"),
        "bench --batch-size above the images": ([*bench[:-4], "--batch-size", "100"], "--batch-size 100"),
        "bench train --json where nothing can be written": ([*CLI, "bench", "train", "--config", cfg, "--json",
                                                             "/proc/r.json"], "cannot write in /proc"),
    }
    one_line_exit_2(cases)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]
    assert list((tmp_path / "a_dir").iterdir()) == []
    assert not (data / "train" / "runs").exists() and not (data / "train" / "class_0" / "g.png").exists()


# --------------------------------------------------------------------------- read-only places, full disks
def _as_unprivileged_root_ok() -> bool:
    if os.geteuid() != 0:
        return True
    return shutil.which("setpriv") is not None and subprocess.run(
        ["setpriv", "--bounding-set=-dac_override", "true"], capture_output=True).returncode == 0


def _unprivileged(cmd: list) -> list:
    """As root, without CAP_DAC_OVERRIDE a folder's mode bits apply (root ignores them otherwise)."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd] if os.geteuid() == 0 else cmd


@pytest.mark.skipif(not _as_unprivileged_root_ok(), reason="cannot drop CAP_DAC_OVERRIDE here")
def test_a_read_only_place_is_one_line_before_any_work(base, data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    train = str(data / "train")
    cases = {
        "trainer out_dir": (_unprivileged([*TRAIN, "--config", str(base), f"train.out_dir={locked}/run"]),
                            f"cannot write in {locked}"),
        "show --out": (_unprivileged([*CLI, "show", "--root", train, "--out", f"{locked}/g.png"]), "cannot write"),
        "synth OUT": (_unprivileged([*CLI, "data", "synth", f"{locked}/s", "--images", "4", "--classes", "2"]),
                      "cannot write"),
        "verify clean list": (_unprivileged([*CLI, "data", "verify", train, "--write-clean-list", f"{locked}/c.txt"]),
                              "cannot write"),
    }
    try:
        one_line_exit_2(cases)
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def _small_disk_works(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    flags = "-m" if os.geteuid() == 0 else "-rm"
    return subprocess.run(["unshare", flags, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(tmp)],
                          capture_output=True).returncode == 0


def on_small_disk(mount: Path, size_kb: int, command: list, fill: bool = True) -> list:
    """``command`` in a private mount namespace where ``mount`` is a tmpfs of ``size_kb``, full if ``fill``."""
    fill_cmd = 'head -c 100M /dev/zero > "$0/fill" 2>/dev/null;' if fill else ""
    script = f'mount -t tmpfs -o size={size_kb}k tmpfs "$0" || exit 99; {fill_cmd} exec "$@"'
    return ["unshare", "-m" if os.geteuid() == 0 else "-rm", "sh", "-c", script, str(mount), *command]


def test_a_full_disk_is_one_line_before_any_work(base, data, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _small_disk_works(disk):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    train = str(data / "train")
    bench = [*CLI, "bench", "loader", "--root", train, "--views", "1", "--variants", "dali-fused", "--batch-size", "8"]
    cases = {
        "trainer out_dir": (on_small_disk(disk, 256, [*TRAIN, "--config", str(base), f"train.out_dir={disk}/run"]),
                            "the disk is full"),
        "trainer out_dir without room for its checkpoints": (
            on_small_disk(disk, 512, [*TRAIN, "--config", str(base), f"train.out_dir={disk}/run"], fill=False),
            "MB needed"),
        "show --out": (on_small_disk(disk, 256, [*CLI, "show", "--root", train, "--out", f"{disk}/g.png"]),
                       "the disk is full"),
        "verify clean list": (on_small_disk(disk, 256, [*CLI, "data", "verify", train, "--write-clean-list",
                                                        f"{disk}/c.txt"]), "the disk is full"),
        "bench --json": (on_small_disk(disk, 256, [*bench, "--json", f"{disk}/r.json"]), "the disk is full"),
        "synth OUT": (on_small_disk(disk, 256, [*CLI, "data", "synth", f"{disk}/s", "--images", "4", "--classes",
                                                "2"]), "the disk is full"),
    }
    one_line_exit_2(cases)
    assert list(disk.iterdir()) == []  # the tmpfs lived in its own mount namespace only


def test_a_data_mistake_found_by_the_ranks_is_said_once_under_nproc(base, data, tmp_path):
    """Past the check (which sees no checkpoint problem), the two ranks find the same resume error:
    one line, exit 2, and none of torchrun's failure report."""
    out = tmp_path / "run"
    values = tiny(data, out, train={"max_steps": 1})
    config = write_yaml(values, tmp_path / "run.yaml")
    assert subprocess.run([*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, capture_output=True,
                          timeout=300).returncode == 0
    done = subprocess.run([*CLI, "train", "--config", str(config), "--nproc", "2", "train.max_steps=2"], cwd=REPO,
                          env={**ENV, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "world size: checkpoint 1, now 2" in lines[0], done.stderr[-3000:]
    assert "ChildFailedError" not in done.stderr and "Traceback" not in done.stderr


def test_odd_roots_are_one_line_for_every_data_tool(tmp_path):
    """A root that is itself a file, or an empty folder, is one line for every data tool."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    write_image_folder(tmp_path / "ok", classes=1, per_class=2, size_range=(16, 20))
    cases = {
        "verify a file": ([*CLI, "data", "verify", str(a_file)], "image folder not found"),
        "verify an empty folder": ([*CLI, "data", "verify", str(tmp_path / "empty")], "no class folders"),
        "show an empty folder": ([*CLI, "show", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "g.png")],
                                 "no class folders"),
        "pack into the source": ([*CLI, "data", "pack", str(tmp_path / "ok"), str(tmp_path / "ok" / "out")],
                                 "inside the source folder"),
    }
    one_line_exit_2(cases)
