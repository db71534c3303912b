"""`dali-ba bench`: the variants do the work they claim, produce the same output, and the CLI writes
what it promises. No timing assertions: these run on a busy 2-core machine."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_ba.augment import AugmentSpec
from dali_ba.pipeline import DecodeOptions, build_train_pipeline

DECODER = re.compile(r"(__Image_\d+|decode_view\d+)$")


def _decoders_run(pipe) -> list:
    """The decoder operators the executor really runs (after DALI's graph optimisation)."""
    pipe.run()
    return [name for name in pipe.executor_statistics() if DECODER.search(name)]


def _files(folder: Path, n: int = 8):
    files = sorted(str(p) for p in folder.rglob("*.jpg"))[:n]
    return files, [0] * len(files)


STATS = dict(exec_dynamic=False, enable_memory_stats=True)  # executor statistics name every operator


def test_naive_variant_really_decodes_once_per_view(image_folder):
    files, labels = _files(image_folder)
    common = dict(batch_size=4, num_views=3, spec=AugmentSpec(image_size=16), decode=DecodeOptions(num_threads=1),
                  seed=1, pipeline_options=STATS)
    naive = build_train_pipeline(files, labels, decode_per_view=True, **common)
    fused = build_train_pipeline(files, labels, **common)
    assert len(_decoders_run(naive)) == 3
    assert len(_decoders_run(fused)) == 1


def test_dali_merges_identical_unnamed_decoders(image_folder):
    """Why the naive variant names its decoders: three identical ones silently become one."""
    from nvidia.dali import fn, pipeline_def, types

    files, _ = _files(image_folder)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=1, **STATS)
    def three_decoders():
        encoded, _ = fn.readers.file(files=files)
        return tuple(fn.random_resized_crop(fn.decoders.image(encoded, device="cpu", output_type=types.RGB), size=(8, 8))
                     for _ in range(3))

    pipe = three_decoders()
    pipe.build()
    assert len(_decoders_run(pipe)) == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_views_equal_m_ordinary_branches(image_folder, channels_last):
    """The fused M-view graph (one decode, M outputs) gives bit for bit what M ordinary
    single-view branches (crop → normalise with mirror) stacked in float give, and the loader's
    assembled batch holds exactly those views."""
    from nvidia.dali import fn, pipeline_def, types

    files, labels = _files(image_folder, 12)
    spec = AugmentSpec(image_size=24, channels_last=channels_last)
    pipe = build_train_pipeline(files, labels, batch_size=4, num_views=3, spec=spec,
                                decode=DecodeOptions(num_threads=1), seed=5)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=5, enable_checkpointing=True)
    def ordinary():
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
        decoded = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        views = []
        for _ in range(3):  # the same operators, created in the same order (so the same seeds)
            crop = fn.random_resized_crop(decoded, size=(24, 24), random_area=(0.08, 1.0),
                                          random_aspect_ratio=(3 / 4, 4 / 3))
            views.append(fn.crop_mirror_normalize(
                crop, mirror=fn.random.coin_flip(), dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                mean=[m * 255 for m in spec.mean], std=[s * 255 for s in spec.std]))
        return fn.stack(*views), label

    ref = ordinary()
    ref.build()
    for _ in range(2):
        *views, _ = pipe.run()
        theirs, _ = ref.run()
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


@pytest.mark.parametrize("variant", ["dali-fused", "dali-naive", "torchvision", "dali-fused-noaa"])
def test_variants_give_the_same_output(tmp_path, variant):
    """Same shape, dtype, channel order and normalisation, labels repeated per view, in every variant."""
    from dali_ba.bench_loader import MEAN, STD, Case, LoaderBenchSettings, start

    colours = _flat_colour_folder(tmp_path)
    s = LoaderBenchSettings(root=str(tmp_path), batch_size=4, threads=1, image_size=20, device="cpu")
    source = start(s, Case(variant, 3))
    try:
        images, labels = source.next_batch()
    finally:
        source.close()
    assert images.shape == (12, 3, 20, 20) and images.dtype == torch.float32
    assert labels.shape == (12,) and labels.dtype == torch.long
    assert torch.equal(labels, labels[::3].repeat_interleave(3))
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    for view, label in zip(pixels, labels):
        rgb = (view.mean(dim=(1, 2)) * 255).tolist()
        assert float((view * 255 - torch.tensor(rgb).view(3, 1, 1)).abs().max()) < 3  # flat: one colour
        nearest = min(colours, key=lambda c: sum(abs(x - y) for x, y in zip(c, rgb)))
        assert max(abs(x - y) for x, y in zip(nearest, rgb)) < 3, (rgb, nearest)  # RGB order, 0..1 scale
        assert colours[nearest] == int(label)


def test_process_tree_cpu_counts_live_children():
    from dali_ba.bench_loader import process_tree_cpu_seconds

    before = process_tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                              "while time.process_time()-t<0.5: pass\nprint('done', flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"  # the child has burnt 0.5 s of CPU and lives on
        assert process_tree_cpu_seconds() - before > 0.4  # counted although it has not exited
    finally:
        child.kill()
        child.wait()


def test_cli_loader_end_to_end_writes_json_table_and_plot(tmp_path, image_folder, capsys):
    from dali_ba.cli import main

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "loader", "--root", str(image_folder), "--views", "1,2", "--batch-size", "4",
               "--threads", "1", "--repeats", "1", "--batches", "2", "--warmup", "1", "--image-size", "16", "--min-seconds", "0",
               "--device", "cpu", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert {"machine", "versions", "results", "command", "settings"} <= set(record)
    assert record["versions"]["dali"] and record["versions"]["torch"]
    assert len(record["results"]) == 6  # 3 variants × 2 values of M
    for r in record["results"]:
        assert {"variant", "num_views", "images_per_s", "views_per_s", "cpu_s_per_image", "repeats"} <= set(r)
        assert r["variant"] in ("dali-fused", "dali-naive", "torchvision") and r["num_views"] in (1, 2)
        assert r["views_per_s"] == pytest.approx(r["images_per_s"] * r["num_views"])
        assert len(r["repeats"]) == 1 and r["cpu_s_per_image"] > 0
    assert set(record["ratios"]) == {"M=1", "M=2"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| variant | M |" in table and "| dali-fused | 2 |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--preset", "dali-rn50"],
                                   ["--device", "cpu", "--hw-decoder-load", "0.12"]])
def test_gpu_settings_refuse_clearly_without_a_gpu(image_folder, capsys, extra):
    from dali_ba.cli import main

    assert main(["bench", "loader", "--root", str(image_folder)] + extra) == 2
    err = capsys.readouterr().err
    assert "dali-ba: error:" in err and ("GPU" in err or "--device cuda" in err)


@pytest.mark.parametrize("compiled", [False, True])
def test_cli_train_reports_the_data_wait_fraction(tmp_path, image_folder, compiled):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data:\n  train_root: {image_folder}\n  batch_size: 4\n  num_views: 2\n  image_size: 16\n"
                      "  device: cpu\n  num_threads: 1\nmodel:\n  arch: smallnet\n")
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "-m", "dali_ba.cli", "bench", "train", "--config", str(config),
                           "--steps", "2", "--warmup", "1", "--rounds", "1", "--json", str(out), "data.num_views=3",
                           f"train.compile={str(compiled).lower()}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "data-wait fraction" in proc.stdout
    summary = json.loads(out.read_text())["summary"]
    assert 0.0 <= summary["data_wait_fraction"] <= 1.0
    assert summary["real_samples_per_s"] == pytest.approx(3 * summary["real_images_per_s"])
    assert summary["compiled"] is compiled
