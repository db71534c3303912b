"""Trainer pieces on their own: models, view-chunked accumulation, optimizer groups, checkpoints."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dali_ba.config import config_to_dict
from dali_ba.errors import ConfigError
from trainers import checkpoint as ckpt
from trainers.config import config_from_dict
from trainers.engine import forward_backward
from trainers.models import build_model
from trainers.optim import param_groups


@pytest.mark.parametrize("arch,size,params", [
    ("resnet8", 28, 75_290), ("resnet20", 32, 269_722), ("resnet44", 32, 658_586), ("resnet56", 32, 853_018),
    ("smallnet", 16, None), ("resnet18", 32, None), ("resnet50", 32, None),
])
def test_models_by_name(arch, size, params):
    model = build_model(arch, 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    if params is not None:  # He et al. 2016 Table 6: 0.27M / 0.66M / 0.85M
        assert sum(p.numel() for p in model.parameters()) == params


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch"):
        build_model("resnet7", 10)


class _NoScaler:
    def scale(self, loss):
        return loss


def test_view_chunks_hold_all_images_and_accumulate_the_mean_loss():
    B, M, K = 3, 4, 2
    # pixel value = 10·b + v: each chunk must hold all B images, views [c·M/K, (c+1)·M/K)
    images = (
        torch.tensor([[10.0 * b + v] for b in range(B) for v in range(M)]).view(B * M, 1, 1, 1).expand(B * M, 1, 2, 2)
    )
    labels = torch.arange(B).repeat_interleave(M)
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    def loss_fn(x, y):
        seen.append(sorted(x[:, 0, 0, 0].tolist()))
        return F.cross_entropy(model(x), y)

    total = forward_backward(model, images.contiguous(), labels, loss_fn, _NoScaler(), K, B, M, torch.contiguous_format)
    assert seen == [
        sorted(10.0 * b + v for b in range(B) for v in (0, 1)),
        sorted(10.0 * b + v for b in range(B) for v in (2, 3)),
    ]
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    whole = forward_backward(
        model,
        images.contiguous(),
        labels,
        lambda x, y: F.cross_entropy(model(x), y),
        _NoScaler(),
        1,
        B,
        M,
        torch.contiguous_format,
    )
    assert total.item() == pytest.approx(whole.item(), rel=1e-6)  # mean over all M·B samples
    for a, p in zip(chunked, model.parameters()):  # no BatchNorm here, so the same gradient
        torch.testing.assert_close(a, p.grad)


def test_no_weight_decay_for_bn_and_bias():
    model = build_model("resnet8", 10)
    decay, no_decay = param_groups(model, 5e-4, True)
    assert no_decay["weight_decay"] == 0 and all(p.ndim == 1 for p in no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(param_groups(model, 5e-4, False)) == 1


def test_save_atomic_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_atomic({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ckpt.save_atomic({"step": 2, "bad": lambda: None}, path)  # fails while pickling
    assert torch.load(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_resolve_resume(tmp_path):
    out = tmp_path / "run"
    assert ckpt.resolve_resume("auto", out) is None  # fresh start
    last = ckpt.checkpoint_dir(out) / ckpt.LAST
    ckpt.save_atomic({"step": 3}, last)
    assert ckpt.resolve_resume("auto", out) == last
    assert ckpt.resolve_resume("none", out) is None
    assert ckpt.resolve_resume(str(out), tmp_path / "other") == last  # a run directory
    assert ckpt.resolve_resume(str(last), tmp_path / "other") == last  # a file
    with pytest.raises(ckpt.ResumeError, match="does-not-exist"):
        ckpt.resolve_resume(str(tmp_path / "does-not-exist"), out)
    with pytest.raises(ckpt.ResumeError, match="not a dali-ba trainer checkpoint"):
        ckpt.load(last)


def test_config_differences_name_the_keys_that_matter():
    a = config_to_dict(config_from_dict({}))
    b = config_to_dict(
        config_from_dict({"data": {"num_views": 2, "num_threads": 7}, "train": {"max_steps": 9, "out_dir": "x"}})
    )
    assert ckpt.config_differences(a, b) == [
        "data.num_views: checkpoint 4, now 2"
    ]  # threads, max_steps, out_dir may change


def test_another_world_size_needs_a_global_batch_and_loose_files(tmp_path):
    """Elastic resume is allowed with data.global_batch_size (batch_size may then differ), refused
    without it, and refused for a packed dataset: one line each."""
    from trainers.config import for_world

    elastic = config_from_dict({"data": {"global_batch_size": 8}})
    saved = {"config": config_to_dict(for_world(elastic, 2)), "world_size": 2}
    ckpt.check_compatible(saved, config_to_dict(for_world(elastic, 4)), 4, tmp_path)
    with pytest.raises(ckpt.ResumeError, match="a packed dataset's reader cannot re-deal"):
        ckpt.check_compatible(saved, config_to_dict(for_world(elastic, 4)), 4, tmp_path, packed=True)
    plain = config_to_dict(config_from_dict({}))
    with pytest.raises(ckpt.ResumeError, match="set data.global_batch_size"):
        ckpt.check_compatible({"config": plain, "world_size": 2}, plain, 4, tmp_path)
    assert for_world(elastic, 4).data.batch_size == 2
    with pytest.raises(ConfigError, match="does not divide among 3 ranks"):
        for_world(elastic, 3)
