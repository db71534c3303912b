"""The trainer's GPU settings where the CPU can reach them: per-device CUDA RNG state in
checkpoints, fused SGD, DDP gradients as bucket views, and one host collective per step with the
loss read on the host only at the log interval. (tests/test_gpu.py runs the GPU side.)"""
from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import tiny

from trainers import checkpoint as ckpt
from trainers import dist as tdist
from trainers.config import config_from_dict
from trainers.engine import build_engine
from trainers.metrics import TrainWindow
from trainers.optim import build_optimizer


class _FakeCuda:
    """torch.cuda's RNG functions as a machine with ``devices`` GPUs would answer them; the
    ``*_all`` variants fail as torch's do when a saved list is longer than the visible GPUs."""

    def __init__(self, devices: int):
        self.devices, self.set_calls = devices, []

    def get_rng_state(self, device="cuda"):
        return torch.full((8,), 7, dtype=torch.uint8)

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.devices)]

    def set_rng_state(self, state, device="cuda"):
        self.set_calls.append(("current", state))

    def set_rng_state_all(self, states):
        for i, s in enumerate(states):
            if i >= self.devices:
                raise IndexError("list index out of range")  # torch/cuda/random.py, fewer GPUs
            self.set_calls.append((i, s))


def _patch_cuda(monkeypatch, fake: _FakeCuda) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))


def test_checkpoint_saves_and_restores_only_the_current_gpus_rng_state(monkeypatch):
    """Saved on a node with 8 visible GPUs, restored on one with 2: only this rank's own device's
    generator is in the checkpoint, so the restore cannot index past the visible GPUs."""
    _patch_cuda(monkeypatch, _FakeCuda(devices=8))
    saved = ckpt.rng_state()
    assert isinstance(saved["cuda"], torch.Tensor)  # one device's state, not a list of 8

    smaller = _FakeCuda(devices=2)
    _patch_cuda(monkeypatch, smaller)
    ckpt.set_rng_state(saved)
    assert [where for where, _ in smaller.set_calls] == ["current"]
    assert torch.equal(smaller.set_calls[0][1], saved["cuda"])


def test_checkpoint_rng_state_without_cuda_has_no_cuda_entry():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    state = ckpt.rng_state()
    assert state["cuda"] is None
    ckpt.set_rng_state(state)  # and a CPU run restores it


def test_fused_sgd_is_chosen_by_the_caller_and_steps_like_the_plain_one():
    cfg = config_from_dict({})
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    plain, fused = build_optimizer(a, cfg.optim), build_optimizer(b, cfg.optim, fused=True)
    assert not plain.defaults.get("fused") and fused.defaults["fused"] is True
    x = torch.randn(5, 4)
    for model, opt in ((a, plain), (b, fused)):
        for group in opt.param_groups:
            group["lr"] = 0.1
        model(x).square().mean().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_engine_on_the_cpu_uses_the_plain_sgd_and_leaves_cudnn_alone(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = config_from_dict({"model": {"arch": "smallnet"}})
    engine = build_engine(cfg, tdist.DistEnv(), num_classes=3)
    assert not engine.optimizer.defaults.get("fused")
    assert torch.backends.cudnn.benchmark is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_keeps_gradients_as_views_of_its_buckets():
    """A real one-process gloo group: the trainer's DDP wrapper shares gradient and bucket memory."""
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        env = tdist.DistEnv(rank=0, world=1, backend="gloo", control=dist.group.WORLD)
        cfg = config_from_dict({"model": {"arch": "smallnet"}})
        engine = build_engine(cfg, env, num_classes=3)
        assert isinstance(engine.ddp, torch.nn.parallel.DistributedDataParallel)
        assert engine.ddp.gradient_as_bucket_view is True
        loss, _ = engine.step(torch.randn(8 * 4, 3, 16, 16), torch.randint(0, 3, (8 * 4,)), 0.1, 0)
        assert torch.isfinite(loss)
        del engine
    finally:
        dist.destroy_process_group()


def test_one_host_collective_per_step_and_the_loss_read_only_at_the_log_interval(data, tmp_path, monkeypatch):
    """12 steps at log_every=5: 12 step collectives plus the final checkpoint's flush; the loss
    crosses to the host 3 times (steps 5, 10 and the final line), not once per step."""
    from trainers.loop import run

    reductions, reads = [], []
    real_reduce, real_read = tdist.all_reduce_sum, TrainWindow.loss_sum
    monkeypatch.setattr(tdist, "all_reduce_sum", lambda env, values: reductions.append(len(values))
                        or real_reduce(env, values))
    monkeypatch.setattr(TrainWindow, "loss_sum", lambda self: reads.append(self.steps) or real_read(self))
    values = tiny(data, tmp_path / "run", train={"epochs": 2, "max_steps": 12, "log_every": 5,
                                                 "checkpoint_every": 100, "eval_every": 100})
    values["data"]["val_root"] = None
    assert run(config_from_dict(values)) == 0
    assert len(reductions) == 12 + 1
    # The loss and the count of non-finite steps rode along with the failure, pre-emption and
    # interrupt flags at steps 5 and 10.
    assert reductions.count(5) == 2
    assert reads == [5, 5, 2]
