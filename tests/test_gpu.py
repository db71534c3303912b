"""The loaders and the trainer's step on a CUDA GPU: every recipe and option, exact resume, the
GPU-vs-CPU statistics, memory over epochs, the device of a torchrun rank. Skipped without CUDA.

Tolerances, and why:
- GPU and CPU decoders differ in pixels (nvJPEG/hardware IDCT and chroma upsampling against
  libjpeg-turbo's), by a few grey levels, mostly at edges; neither is wrong. So GPU views are
  compared with CPU views of the same images by per-image, per-channel mean and standard deviation
  of the normalised views, within ``STAT_TOL`` = 0.05 (about 3 grey levels of 255 after dividing
  by ImageNet's std of ~58 levels), never pixel for pixel.
- DALI allocates device memory in its own pools (not torch's allocator), sized by the largest
  batch seen: memory is measured device-wide (``torch.cuda.mem_get_info``) and process-wide (RSS)
  after warm-up epochs, and must stop growing (``DEVICE_GROWTH``, ``HOST_GROWTH``).
- Whether the GPU has a hardware JPEG decoder (A100, H100 do) changes nothing asserted here.
"""
from __future__ import annotations

import gc
import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.processes import rss_bytes
from dali_ba import BatchAugmentLoader, EvalLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=4, image_size=32, device="cuda", num_threads=2)
STAT_TOL = 0.05
DEVICE_GROWTH = 96 * 2**20
HOST_GROWTH = 256 * 2**20


def _differ_pairwise(grouped: torch.Tensor) -> None:
    """Every pair of views of every image differs ([B, M, ...])."""
    for b in range(grouped.shape[0]):
        for i, j in itertools.combinations(range(grouped.shape[1]), 2):
            assert not torch.equal(grouped[b, i], grouped[b, j]), f"image {b}: views {i} and {j} are identical"


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_gpu_views_are_cuda_tensors_and_differ_pairwise(image_folder, augment):
    loader = BatchAugmentLoader(image_folder, num_views=4, augment=augment, layout="grouped", hw_decoder_load=0.5,
                                **SMALL)
    images, labels = next(iter(loader))
    assert images.device == labels.device == torch.device("cuda", loader.device_id)
    assert images.shape == (4, 4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert torch.isfinite(images).all()
    _differ_pairwise(images)


@pytest.mark.parametrize("dtype, channels_last, layout", [
    ("float16", True, "flat"), ("float16", False, "grouped"), ("float32", True, "grouped"),
])
def test_gpu_dtype_channels_last_and_layout(image_folder, dtype, channels_last, layout):
    loader = BatchAugmentLoader(image_folder, num_views=2, dtype=dtype, channels_last=channels_last, layout=layout,
                                preallocate_width_hint=100, preallocate_height_hint=100, **SMALL)
    images, labels = next(iter(loader))
    assert images.is_cuda and images.dtype == getattr(torch, dtype) and torch.isfinite(images.float()).all()
    if layout == "flat":
        assert images.shape == (8, 3, 32, 32) and torch.equal(labels, labels[::2].repeat_interleave(2))
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
    else:  # [B, M, C, H, W]: channels-last means the channel dimension is the innermost one
        assert images.shape == (4, 2, 3, 32, 32) and labels.shape == (4,)
        assert (images.stride(2) == 1) == channels_last


def test_gpu_trivial_augment_and_colour_jitter_per_view(image_folder):
    loader = BatchAugmentLoader(image_folder, num_views=3, augment="imagenet", trivial_augment=True,
                                color_jitter=0.4, layout="grouped", **SMALL)
    for images, _ in itertools.islice(iter(loader), 3):
        assert images.shape == (4, 3, 3, 32, 32) and torch.isfinite(images).all()
        _differ_pairwise(images)


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_gpu_eval_each_image_once_and_test_time_views(image_folder, augment):
    centre = EvalLoader(image_folder, batch_size=5, image_size=32, augment=augment, device="cuda")
    labels = torch.cat([y for _, y in centre])
    assert labels.is_cuda and len(labels) == 48 and centre.pipeline_builds == 1
    views = EvalLoader(image_folder, batch_size=5, image_size=32, augment=augment, device="cuda", views=3,
                       trivial_augment=augment == "imagenet")
    seen = 0
    for images, y in views:
        assert images.is_cuda and images.shape == (len(y), 3, 3, 32, 32) and torch.isfinite(images).all()
        _differ_pairwise(images)
        seen += len(y)
    assert seen == 48


def test_gpu_resume_is_exact(image_folder):
    """State after k=5 batches; a fresh loader continues with the very same next 3 batches
    (TrivialAugment, colour jitter, the hardware decoder's default share)."""
    opts = dict(num_views=2, seed=5, augment="imagenet", trivial_augment=True, color_jitter=0.3,
                hw_decoder_load=0.65, **SMALL)
    loader = BatchAugmentLoader(image_folder, **opts)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [(x.clone(), y.clone()) for x, y in itertools.islice(it, 3)]
    again = BatchAugmentLoader(image_folder, **opts)
    again.load_state_dict(state)
    for k, ((a, la), (b, lb)) in enumerate(zip(expected, itertools.islice(iter(again), 3))):
        assert torch.equal(la, lb), f"batch {k}: other images"
        assert torch.equal(a, b), f"batch {k}: max |difference| {float((a - b).abs().max()):.4g}"


def _per_image_stats(loader) -> tuple:
    """(labels, per-image per-channel means [N, V, 3], stds [N, V, 3]) over one pass."""
    labels, means, stds = [], [], []
    for images, y in loader:
        x = images.float().cpu()
        x = x if x.dim() == 5 else x.unsqueeze(1)  # [b, V, C, H, W]
        labels.append(y.cpu())
        means.append(x.mean(dim=(3, 4)))
        stds.append(x.std(dim=(3, 4)))
    return torch.cat(labels), torch.cat(means), torch.cat(stds)


@pytest.mark.parametrize("decode_device", ["gpu", "cpu"])
def test_gpu_views_match_cpu_views_of_the_same_images(image_folder, decode_device):
    """The eval view (deterministic) and cifar train views without padding (flips only, which
    keep every channel's mean and std) of every image, on the GPU and on the CPU."""
    common = dict(batch_size=4, image_size=32, num_threads=2, seed=3)
    cases = [
        (EvalLoader, dict(augment="imagenet")),
        (BatchAugmentLoader, dict(augment="cifar", pad=0, num_views=2, layout="grouped")),
    ]
    for cls, opts in cases:
        gpu = _per_image_stats(cls(image_folder, device="cuda", decode_device=decode_device, **common, **opts))
        cpu = _per_image_stats(cls(image_folder, device="cpu", **common, **opts))
        assert torch.equal(gpu[0], cpu[0]), f"{cls.__name__}: the images came in another order"
        for name, g, c in (("mean", gpu[1], cpu[1]), ("std", gpu[2], cpu[2])):
            worst = float((g - c).abs().max())
            assert worst <= STAT_TOL, f"{cls.__name__}: per-image channel {name} differs by up to {worst:.4f}"
            assert float((g.mean(dim=(0, 1)) - c.mean(dim=(0, 1))).abs().max()) <= STAT_TOL / 5


def _memory() -> tuple:
    """(device memory in use on this GPU by anyone, torch's allocated bytes, this process's RSS)."""
    gc.collect()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free, torch.cuda.memory_allocated(), rss_bytes()


def test_gpu_memory_is_flat_over_epochs_and_evaluations(image_folder):
    train = BatchAugmentLoader(image_folder, num_views=4, augment="imagenet", color_jitter=0.3, **SMALL)
    val = EvalLoader(image_folder, batch_size=5, image_size=32, device="cuda", classes=train.classes)

    def epoch_and_eval() -> None:
        for loader in (train, val):
            for images, _ in loader:
                images.sum()  # use the batch, as training would

    for _ in range(2):  # warm-up: DALI's pools grow to the largest batches of the data set
        epoch_and_eval()
    samples = [_memory()]
    for _ in range(6):
        epoch_and_eval()
        samples.append(_memory())
    (dev0, torch0, rss0), (dev1, torch1, rss1) = samples[0], samples[-1]
    trace = ", ".join(f"{d / 2**20:.0f}" for d, _, _ in samples)
    assert dev1 - dev0 <= DEVICE_GROWTH, f"device memory (MiB) after each epoch+eval: {trace}"
    assert torch1 - torch0 <= 8 * 2**20, f"torch's allocator grew by {(torch1 - torch0) / 2**20:.1f} MiB"
    assert rss1 - rss0 <= HOST_GROWTH, f"host RSS grew by {(rss1 - rss0) / 2**20:.0f} MiB"
    assert train.pipeline_builds == 1 and val.pipeline_builds == 1


def test_gpu_batches_are_the_callers_to_keep(image_folder):
    """Batches held while the pipeline runs on (prefetching into its recycled buffers) stay intact."""
    loader = BatchAugmentLoader(image_folder, num_views=2, prefetch=2, **SMALL)
    it = iter(loader)
    kept = [next(it) for _ in range(3)]
    copies = [(x.clone(), y.clone()) for x, y in kept]
    for _ in range(6):
        next(it)
    torch.cuda.synchronize()
    for (x, y), (cx, cy) in zip(kept, copies):
        assert torch.equal(x, cx) and torch.equal(y, cy)


@pytest.mark.parametrize("load", [0.0, 1.0])
def test_gpu_hardware_decoder_share_does_not_change_the_output_kind(image_folder, load):
    """All JPEGs to the CUDA decoder, or all to the hardware decoder (CUDA where the GPU has none)."""
    images, labels = next(iter(BatchAugmentLoader(image_folder, num_views=2, hw_decoder_load=load, **SMALL)))
    assert images.shape == (8, 3, 32, 32) and torch.isfinite(images).all() and labels.is_cuda


@pytest.mark.parametrize("mode", ["full", "crop"])
def test_gpu_naive_graphs_decode_per_view(image_folder, mode):
    loader = BatchAugmentLoader(image_folder, num_views=3, decode_per_view=mode, layout="grouped", **SMALL)
    images, _ = next(iter(loader))
    assert images.shape == (4, 3, 3, 32, 32) and images.is_cuda
    _differ_pairwise(images)


RANK_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from dali_ba import BatchAugmentLoader
dist.init_process_group(os.environ["BACKEND"])  # no torch.cuda.set_device anywhere
loader = BatchAugmentLoader(sys.argv[1], batch_size=4, num_views=2, image_size=32, device="cuda")
images, labels = next(iter(loader))
print("RESULT", loader.device_id, images.device, labels.device, loader.num_shards, flush=True)
del loader
dist.destroy_process_group()
"""


def _run_rank_script(tmp_path, image_folder, command_prefix, env) -> str:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    result = subprocess.run([*command_prefix, str(script), str(image_folder)], env=env, capture_output=True,
                            text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))


def test_gpu_loader_under_torchrun_nccl_lands_on_local_rank(tmp_path, image_folder):
    line = _run_rank_script(tmp_path, image_folder, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node=1"], {"BACKEND": "nccl"})
    assert line == "RESULT 0 cuda:0 cuda:0 1"


def test_gpu_loader_picks_local_rank_not_the_current_device(tmp_path, image_folder):
    """LOCAL_RANK = the last GPU while torch's current device stays 0 (needs two GPUs)."""
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("needs two GPUs to tell LOCAL_RANK from the current device")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"BACKEND": "gloo", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(n - 1),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    line = _run_rank_script(tmp_path, image_folder, [sys.executable], env)
    assert line == f"RESULT {n - 1} cuda:{n - 1} cuda:{n - 1} 1"


def test_gpu_trainer_step_uses_cudnn_autotuning_fused_sgd_bf16_and_channels_last(image_folder):
    from trainers import dist as tdist
    from trainers.config import config_from_dict
    from trainers.engine import build_engine

    cfg = config_from_dict({
        "data": {"train_root": str(image_folder), "batch_size": 4, "num_views": 2, "image_size": 32,
                 "device": "cuda"},
        "model": {"arch": "resnet18"}, "train": {"amp": "bf16", "channels_last": True},
    })
    env = tdist.DistEnv(device=torch.device("cuda", torch.cuda.current_device()))
    engine = build_engine(cfg, env, num_classes=3)
    assert torch.backends.cudnn.benchmark is True and engine.optimizer.defaults["fused"] is True
    loader = BatchAugmentLoader.from_config(cfg.data, channels_last=True)
    losses = []
    for step, (images, labels) in enumerate(itertools.islice(iter(loader), 4)):
        assert images.is_contiguous(memory_format=torch.channels_last)
        loss, _ = engine.step(images, labels, 0.05, step)
        losses.append(loss)
    assert all(torch.isfinite(x).item() for x in losses) and losses[0].is_cuda


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_gpu_per_view_options_draw_their_own_parameters(image_folder, augment):
    """Cutout, random erasing and each automatic policy in the GPU graph: CUDA tensors, every view
    its own draw, occlusions filled with 0 after normalisation."""
    for options in (dict(cutout=8, random_erase=1.0), dict(rand_augment=[2, 9]), dict(auto_augment=True),
                    dict(trivial_augment=True)):
        loader = BatchAugmentLoader(image_folder, num_views=4, augment=augment, layout="grouped", **SMALL, **options)
        images, _ = next(iter(loader))
        assert images.is_cuda and images.shape == (4, 4, 3, 32, 32) and torch.isfinite(images).all()
        _differ_pairwise(images)
        if "cutout" in options:
            assert all(bool((images[b, v] == 0).all(dim=0).any()) for b in range(4) for v in range(4))
