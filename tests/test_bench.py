"""`dali-ba bench`: the variants do the work they claim, produce the same output, and the records
hold what was measured. No speed assertions: these run on a busy 2-core machine."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_ba.options import PipelineOptions
from dali_ba.pipeline import build_pipeline
from dali_ba.source import TrainBatches

REPO = Path(__file__).resolve().parents[1]
DECODER = re.compile(r"(__Image\w*_\d+|decode_view\d+)$")
STATS = dict(exec_dynamic=False, enable_memory_stats=True)  # executor statistics name every operator


def _decoders_run(pipe) -> list:
    """The decoder operators the executor really runs (after DALI's graph optimisation)."""
    pipe.run()
    return [name for name in pipe.executor_statistics() if DECODER.search(name)]


def _source(folder: Path, n: int = 8, batch_size: int = 4) -> TrainBatches:
    files = sorted(str(p) for p in folder.rglob("*.jpg"))[:n]
    return TrainBatches(files, np.zeros(len(files), np.int32), batch_size=batch_size, steps=n // batch_size,
                        shard_id=0, num_shards=1, seed=0)


@pytest.mark.parametrize("mode", ["full", "crop"])
def test_naive_variants_really_decode_once_per_view(image_folder, mode):
    spec = PipelineOptions(batch_size=4, image_size=16, num_threads=1, device="cpu")
    common = dict(num_views=3, seed=1, pipeline_options=STATS)
    naive = build_pipeline(_source(image_folder), spec, decode_per_view=mode, **common)
    fused = build_pipeline(_source(image_folder), spec, **common)
    assert len(_decoders_run(naive)) == 3
    assert len(_decoders_run(fused)) == 1


def test_dali_merges_identical_unnamed_decoders(image_folder):
    """Why the naive variants name their decoders: three identical ones silently become one."""
    from nvidia.dali import fn, pipeline_def, types

    files = sorted(str(p) for p in image_folder.rglob("*.jpg"))[:8]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=1, **STATS)
    def three_decoders():
        encoded, _ = fn.readers.file(files=files)
        return tuple(
            fn.random_resized_crop(fn.decoders.image(encoded, device="cpu", output_type=types.RGB), size=(8, 8))
            for _ in range(3)
        )

    pipe = three_decoders()
    pipe.build()
    assert len(_decoders_run(pipe)) == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_views_equal_m_ordinary_branches(image_folder, channels_last):
    """The fused M-view graph (one decode, M outputs) gives bit for bit what M ordinary
    single-view branches (crop → normalise with mirror) stacked in float give."""
    from nvidia.dali import fn, pipeline_def, types

    spec = PipelineOptions(batch_size=4, image_size=24, channels_last=channels_last, num_threads=1, device="cpu")
    source = _source(image_folder, 12)
    pipe = build_pipeline(source, spec, num_views=3, seed=5)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=5)
    def ordinary():
        decoded = fn.decoders.image(
            fn.io.file.read(fn.external_source(name="paths")), device="cpu", output_type=types.RGB
        )
        views = []
        for _ in range(3):  # the same operators, created in the same order (so the same seeds)
            crop = fn.random_resized_crop(
                decoded, size=(24, 24), random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
            )
            views.append(
                fn.crop_mirror_normalize(
                    crop,
                    mirror=fn.random.coin_flip(),
                    dtype=types.FLOAT,
                    output_layout="HWC" if channels_last else "CHW",
                    mean=[m * 255 for m in spec.mean],
                    std=[s * 255 for s in spec.std],
                )
            )
        return fn.stack(*views)

    ref = ordinary()
    ref.build()
    for step in range(2):
        ref.feed_input(
            "paths", [np.frombuffer(source.files[i].encode(), np.uint8) for i in source.batch_indices(0, step)]
        )
    for _ in range(2):
        *views, _ = pipe.run()
        (theirs,) = ref.run()
        a, b = np.stack([np.array(v.as_tensor()) for v in views], axis=1), np.array(theirs.as_tensor())
        assert a.shape == b.shape == ((4, 3, 24, 24, 3) if channels_last else (4, 3, 3, 24, 24))
        assert np.array_equal(a, b)


def _flat_colour_folder(root: Path, count: int = 12) -> dict:
    """Flat-colour JPEGs (every crop and flip of them is the same colour); returns colour → class."""
    colours = {}
    for i in range(count):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = (20 + 15 * i, 220 - 12 * i, 100 + (i % 3) * 40)
        Image.fromarray(np.full((40 + 4 * i, 56, 3), rgb, np.uint8)).save(folder / f"{i:02d}.jpg", quality=95)
        colours[rgb] = i % 2
    return colours


@pytest.mark.parametrize(
    "variant, views",
    [
        ("dali-fused", 3),
        ("dali-naive", 3),
        ("dali-naive-crop", 3),
        ("dali-rebuild", 3),
        ("dali-fused-noaa", 3),
        ("torchvision", 3),
        ("dali-rn50", 1),
    ],
)
def test_variants_give_the_same_output(tmp_path, variant, views):
    """Same shape, dtype, channel order and normalisation, labels repeated per view, in every variant."""
    from benchmarks.loader_bench import Case, LoaderBenchSettings
    from benchmarks.variants import MEAN, STD, start

    colours = _flat_colour_folder(tmp_path)
    s = LoaderBenchSettings(root=str(tmp_path), batch_size=4, threads=1, image_size=20, device="cpu")
    source = start(s, Case(variant, views))
    try:
        assert source.position == 0
        images, labels = source.next_batch()
        assert source.position == 1
    finally:
        source.close()
    assert images.shape == (4 * views, 3, 20, 20) and images.dtype == torch.float32
    assert labels.shape == (4 * views,) and labels.dtype == torch.long
    assert torch.equal(labels, labels[::views].repeat_interleave(views))
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    for view, label in zip(pixels, labels):
        rgb = (view.mean(dim=(1, 2)) * 255).tolist()
        assert float((view * 255 - torch.tensor(rgb).view(3, 1, 1)).abs().max()) < 3  # flat: one colour
        nearest = min(colours, key=lambda c: sum(abs(x - y) for x, y in zip(c, rgb)))
        assert max(abs(x - y) for x, y in zip(nearest, rgb)) < 3, (rgb, nearest)  # RGB order, 0..1 scale
        assert colours[nearest] == int(label)


def _plain_views(images: torch.Tensor, colours: dict) -> list:
    """For each view: flat, and one of the folder's colours (what every crop and flip of it is)."""
    from benchmarks.variants import MEAN, STD

    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    plain = []
    for view in pixels:
        rgb = (view.mean(dim=(1, 2)) * 255).tolist()
        flat = float((view * 255 - torch.tensor(rgb).view(3, 1, 1)).abs().max()) < 3
        plain.append(flat and any(max(abs(x - y) for x, y in zip(c, rgb)) < 3 for c in colours))
    return plain


@pytest.mark.parametrize("variant", ["dali-fused-cutout", "dali-fused-erase", "dali-fused-randaug",
                                     "dali-fused-autoaug", "dali-fused-trivial"])
def test_option_variants_are_the_fused_loader_with_their_option_on(tmp_path, variant):
    """The cost variants: the same batch shape and labels as dali-fused, and the option visibly at
    work (the fused loader's views of flat-colour images are all flat, in the images' colours)."""
    from benchmarks.loader_bench import Case, LoaderBenchSettings
    from benchmarks.variants import start

    colours = _flat_colour_folder(tmp_path)
    s = LoaderBenchSettings(root=str(tmp_path), batch_size=4, threads=1, image_size=20, device="cpu")
    plain, changed = [], []
    for name, out in (("dali-fused", plain), (variant, changed)):
        source = start(s, Case(name, 3))
        try:
            for _ in range(3):
                images, labels = source.next_batch()
                assert images.shape == (12, 3, 20, 20) and images.dtype == torch.float32
                assert torch.equal(labels, labels[::3].repeat_interleave(3))
                out.extend(_plain_views(images, colours))
        finally:
            source.close()
    assert all(plain)
    assert not all(changed), variant
    if variant == "dali-fused-cutout":  # a hole of half the side in every view
        assert not any(changed)


def test_process_tree_cpu_counts_live_children():
    from benchmarks.loader_bench import process_tree_cpu_seconds

    before = process_tree_cpu_seconds()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt=time.process_time()\n"
            "while time.process_time()-t<0.5: pass\nprint('done', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "done"  # the child has burnt 0.5 s of CPU and lives on
        assert process_tree_cpu_seconds() - before > 0.4  # counted although it has not exited
    finally:
        child.kill()
        child.wait()


def test_process_tree_lists_children_then_grandchildren():
    from benchmarks.processes import children, descendants

    code = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(g.pid, flush=True)\ntime.sleep(60)")
    child, grandchild = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True), None
    try:
        grandchild = int(child.stdout.readline())
        assert child.pid in children(os.getpid()) and grandchild not in children(os.getpid())
        tree = descendants(os.getpid())
        assert tree.index(child.pid) < tree.index(grandchild)
        assert descendants(child.pid) == [grandchild] and children(grandchild) == []
    finally:
        if grandchild is not None:
            os.kill(grandchild, 9)
        child.kill()
        child.wait()


def _git_head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_cli_loader_records_what_it_measured(tmp_path, image_folder, capsys):
    """The record holds one result per case, counts that add up, the epoch-boundary measurement of
    short epochs, and the commit it ran; the table and the plot are written."""
    from dali_ba.cli import main

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        [
            "bench",
            "loader",
            "--root",
            str(image_folder),
            "--views",
            "1,2",
            "--batch-size",
            "4",
            "--variants",
            "dali-fused,dali-rebuild,dali-naive",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--batches",
            "9",
            "--warmup",
            "1",
            "--image-size",
            "16",
            "--min-seconds",
            "0",
            "--epoch-images",
            "16",
            "--device",
            "cpu",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["git_commit"] == _git_head() and isinstance(record["git_dirty"], bool)
    assert record["versions"]["dali"] and record["versions"]["torch"]
    assert {(r["variant"], r["num_views"]) for r in record["results"]} == {
        (v, m) for v in ("dali-fused", "dali-rebuild", "dali-naive") for m in (1, 2)
    }
    for r in record["results"]:
        (run,) = r["repeats"]
        assert run["images"] == 4 * 9 and run["images_per_s"] == pytest.approx(run["images"] / run["wall_s"])
        assert run["first_position"] == 1 and run["epoch_starts"] == 2  # 16 images / 4: epochs of 4 batches
        assert "epoch_boundary_s" in r and r["views_per_s"] == pytest.approx(r["images_per_s"] * r["num_views"])
    assert set(record["ratios"]) == {"M=1", "M=2"} and "images_per_s_vs_dali-rebuild" in record["ratios"]["M=2"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| dali-fused | 2 |" in table and "| dali-rebuild | 2 |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--device", "cpu", "--hw-decoder-load", "0.12"]])
def test_gpu_settings_refuse_clearly_without_a_gpu(image_folder, capsys, extra):
    from dali_ba.cli import main

    assert main(["bench", "loader", "--root", str(image_folder)] + extra) == 2
    err = capsys.readouterr().err
    assert "dali-ba: error:" in err and ("GPU" in err or "--device cuda" in err)


def test_trivial_augment_reaches_the_dali_loaders_and_is_refused_where_it_would_not(image_folder, capsys):
    import argparse

    from benchmarks.cli import add_arguments, settings_from_args
    from dali_ba.cli import main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["loader", "--root", str(image_folder), "--device", "cpu", "--trivial-augment",
                              "--variants", "dali-fused,dali-naive-crop"])
    assert settings_from_args(args).options == {"trivial_augment": True}
    assert main(["bench", "loader", "--root", str(image_folder), "--device", "cpu", "--trivial-augment"]) == 2
    assert "torchvision would run without it" in capsys.readouterr().err


def test_a_bad_output_path_is_refused_before_measuring(image_folder, tmp_path, capsys):
    from dali_ba.cli import main

    assert main(["bench", "loader", "--root", str(image_folder), "--plot", str(tmp_path)]) == 2
    assert "--plot" in capsys.readouterr().err


def _tiny_config(tmp_path: Path, image_folder: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"data:\n  train_root: {image_folder}\n  batch_size: 4\n  num_views: 2\n  image_size: 16\n"
        "  device: cpu\n  num_threads: 1\nmodel:\n  arch: smallnet\n"
    )
    return config


def test_train_bench_times_the_trainers_step_and_sees_a_slow_loader(tmp_path, image_folder, monkeypatch):
    """Both phases run the trainer's own step (Engine.step), and a loader made 80 ms slower per
    batch shows up as waiting, not as compute."""
    import time

    from benchmarks.train_bench import run_train_bench
    from dali_ba.loader import BatchAugmentLoader
    from trainers.config import load_config
    from trainers.engine import Engine

    calls, original_step, original_iter = [], Engine.step, BatchAugmentLoader.__iter__

    def counted_step(self, *args):
        calls.append(args[-1])
        return original_step(self, *args)

    def slow_iter(self):
        for batch in original_iter(self):
            time.sleep(0.08)
            yield batch

    monkeypatch.setattr(Engine, "step", counted_step)
    monkeypatch.setattr(BatchAugmentLoader, "__iter__", slow_iter)
    cfg = load_config(_tiny_config(tmp_path, image_folder), ["train.view_chunks=2"])
    summary, rows = run_train_bench(cfg, steps=3, warmup=1, rounds=1, min_seconds=0, log=lambda line: None)
    assert len(calls) == 2 * (1 + 3)  # warm-up and timed steps, both phases
    real, synthetic = rows
    assert (real["phase"], synthetic["phase"]) == ("real", "synthetic")
    # The injected 80 ms per batch is counted as waiting, and the steps' own compute is not.
    assert real["data_wait_s"] >= 3 * 0.08 and synthetic["data_wait_s"] < 0.01
    assert real["data_wait_s"] <= real["seconds"] - 0.5 * synthetic["seconds"]
    assert summary["data_wait_fraction"] == pytest.approx(real["data_wait_s"] / real["seconds"])


def test_cli_train_writes_its_record(tmp_path, image_folder):
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dali_ba.cli",
            "bench",
            "train",
            "--config",
            str(_tiny_config(tmp_path, image_folder)),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--json",
            str(out),
            "data.num_views=3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "data-wait fraction" in proc.stdout
    record = json.loads(out.read_text())
    assert record["git_commit"] == _git_head() and record["config"]["data"]["num_views"] == 3
    summary = record["summary"]
    assert summary["real_samples_per_s"] == pytest.approx(3 * summary["real_images_per_s"])
    assert [r["phase"] for r in record["rounds"]] == ["real", "synthetic"]


def test_cli_train_compare_times_each_variant_in_every_round(tmp_path, image_folder, capsys, monkeypatch):
    """--compare: the base step and each variant's (here mixup + CutMix, an EMA) on synthetic tensors,
    interleaved per round, with a ratio to base; the variants really are built with their overrides."""
    from benchmarks.cli import main
    from trainers.engine import Engine

    built = []
    original = Engine.step

    def step(self, *args):
        built.append((self.mixer is not None, self.ema is not None))
        return original(self, *args)

    out = tmp_path / "compare.json"
    monkeypatch.setattr(Engine, "step", step)
    assert main(["train", "--config", str(_tiny_config(tmp_path, image_folder)), "--steps", "2", "--warmup", "1",
                 "--rounds", "2", "--json", str(out), "--compare", "mix:train.mixup=0.2,train.cutmix=1.0",
                 "--compare", "ema:train.ema_decay=0.99"]) == 0
    assert sorted(set(built)) == [(False, False), (False, True), (True, False)]
    assert len(built) == 3 * 2 * (1 + 2)
    table = capsys.readouterr().out
    assert "| mix | train.mixup=0.2,train.cutmix=1.0 |" in table and "| ema | train.ema_decay=0.99 |" in table
    record = json.loads(out.read_text())
    assert record["kind"] == "train-options" and record["summary"]["base"]["step_s_vs_base"] == 1.0
    assert all(r["step_s"] > 0 and r["cpu_s"] > 0 for r in record["rounds"])
    assert [(r["round"], r["variant"]) for r in record["rounds"]] == [
        (0, "base"), (0, "mix"), (0, "ema"), (1, "mix"), (1, "ema"), (1, "base")]
    assert main(["train", "--config", str(_tiny_config(tmp_path, image_folder)), "--compare", "train.mixup=0.2"]) == 2
