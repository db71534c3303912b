"""Gradient-noise diagnostics: the estimators, the probe's side effects, and the DDP hook (2 ranks)."""
from __future__ import annotations

import copy
import gc
import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainers import dist as tdist
from trainers.diagnostics import GradNoiseMonitor, pair_estimates
from trainers.engine import forward_backward
from trainers.models import SmallNet


def test_pair_estimates_are_unbiased():
    """McCandlish App. A on synthetic per-sample gradients: mean of the estimates -> truth."""
    rng = np.random.default_rng(0)
    d, b_small, b_big, trials = 40, 4, 32, 4000
    mu, sigma = rng.normal(0, 0.3, d), rng.uniform(0.5, 1.5, d)
    g2, trace = [], []
    for _ in range(trials):
        samples = mu + sigma * rng.normal(size=(b_big, d))
        est = pair_estimates(float((samples[:b_small].mean(0) ** 2).sum()), b_small,
                             float((samples.mean(0) ** 2).sum()), b_big)
        g2.append(est["noise_g2"])
        trace.append(est["noise_trace"])
    assert np.mean(g2) == pytest.approx(float((mu**2).sum()), rel=0.1)
    assert np.mean(trace) == pytest.approx(float((sigma**2).sum()), rel=0.05)


def _grad_vector(model, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _batch(B=6, M=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B * M, 3, 8, 8, generator=g), torch.randint(0, classes, (B,), generator=g).repeat_interleave(M)


def test_view_probe_single_process_matches_a_direct_computation_and_has_no_side_effects():
    B, M = 6, 3
    torch.manual_seed(0)
    model = SmallNet(3)
    x, y = _batch(B, M)
    ref = copy.deepcopy(model)
    G = _grad_vector(ref, x, y)
    g_view = _grad_vector(copy.deepcopy(model), x.view(B, M, 3, 8, 8)[:, 0], y.view(B, M)[:, 0])

    plain = copy.deepcopy(model)  # the same step without diagnostics
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    forward_backward(
        plain, x, y, lambda a, b: F.cross_entropy(plain(a), b), _NoScaler(), 1, B, M, torch.contiguous_format
    )
    opt_plain.step()

    monitor = GradNoiseMonitor(every=1, batch_size=B, num_views=M, world=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    buffers = [b.clone() for b in model.buffers()]
    monitor.probe(model, x, y, lambda a, b: F.cross_entropy(model(a), b), 1.0)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # BN statistics restored
    forward_backward(
        model, x, y, lambda a, b: F.cross_entropy(model(a), b), _NoScaler(), 1, B, M, torch.contiguous_format
    )
    stats = monitor.measure(model, tdist.DistEnv())
    opt.step()

    assert stats["probe"] == "view" and stats["probe_view"] == 0
    assert stats["grad_norm2"] == pytest.approx(float(G.pow(2).sum()), rel=1e-5)
    assert stats["grad_norm2_view"] == pytest.approx(float(g_view.pow(2).sum()), rel=1e-5)
    assert stats["view_grad_var"] == pytest.approx(float((g_view - G).pow(2).sum()), rel=1e-4)
    assert stats["aug_noise_trace"] == pytest.approx(stats["view_grad_var"] * B * M / (M - 1))
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # the probe did not change the training step at all

    # next measurement: the half-batch probe gives a noise-scale pair
    monitor.probe(model, x, y, lambda a, b: F.cross_entropy(model(a), b), 1.0)
    forward_backward(
        model, x, y, lambda a, b: F.cross_entropy(model(a), b), _NoScaler(), 1, B, M, torch.contiguous_format
    )
    half = monitor.measure(model, tdist.DistEnv())
    assert half["probe"] == "half" and half["noise_pair"] == "half"
    assert {"noise_trace", "noise_g2", "noise_scale"} <= set(half)
    # the EMA-based ratios (one measurement each so far) exist only when their averages are positive
    assert ("noise_scale_ema" in half) == (half["noise_trace"] > 0 and half["noise_g2"] > 0)
    assert ("ba_var_reduction" in half) == (half["noise_trace"] > 0)


class _NoScaler:
    def scale(self, loss):
        return loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    env = tdist.DistEnv(rank, world, 0, torch.device("cpu"), "gloo", dist.group.WORLD)
    B, M = 4, 2
    torch.manual_seed(0)
    model = SmallNet(3)
    x_all, y_all = _batch(B * world, M, seed=1)
    x, y = x_all[rank * B * M : (rank + 1) * B * M], y_all[rank * B * M : (rank + 1) * B * M]
    # by hand: this rank's local gradient and its view-0 gradient, without DDP
    G_local = _grad_vector(copy.deepcopy(model), x, y)
    g_view = _grad_vector(copy.deepcopy(model), x.view(B, M, 3, 8, 8)[:, 0], y.view(B, M)[:, 0])
    manual = torch.tensor([float(G_local.pow(2).sum()), float((g_view - G_local).pow(2).sum())], dtype=torch.float64)
    G_sum = G_local.clone()
    dist.all_reduce(manual)
    dist.all_reduce(G_sum)

    ddp = DDP(model)
    monitor = GradNoiseMonitor(every=1, batch_size=B, num_views=M, world=world)
    monitor.attach(ddp)
    def loss_fn(a, b, net=ddp):
        return F.cross_entropy(net(a), b)

    monitor.probe(ddp, x, y, loss_fn, 1.0)
    forward_backward(ddp, x, y, loss_fn, _NoScaler(), 1, B, M, torch.contiguous_format)
    stats = monitor.measure(ddp, env)
    expected = {
        "grad_norm2": float((G_sum / world).pow(2).sum()),
        "grad_norm2_local": float(manual[0]) / world,
        "view_grad_var": float(manual[1]) / world,
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"stats": stats, "expected": expected}, f)
    # As trainers.dist.shutdown asks: DDP sits in reference cycles (the lambda holds it too), and
    # one left for interpreter teardown aborted this rank ("terminate called without an active
    # exception") in ~1 of 12 runs; collected first: 0 in 100.
    del ddp, loss_fn
    gc.collect()
    dist.destroy_process_group()


def test_ddp_hook_reads_each_ranks_local_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        stats, expected = result["stats"], result["expected"]
        assert stats["noise_pair"] == "ddp" and stats["probe"] == "view"
        for key, value in expected.items():
            assert stats[key] == pytest.approx(value, rel=1e-4), key
        assert stats["noise_trace"] == pytest.approx(
            pair_estimates(expected["grad_norm2_local"], 4, expected["grad_norm2"], 8)["noise_trace"], rel=1e-4
        )
