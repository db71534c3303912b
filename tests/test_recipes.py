"""The recipes under pipelines/ and the model options that make them the authors' (convNet.pytorch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dali_ba.config import config_to_dict
from dali_ba.errors import ConfigError
from trainers import checkpoint as ckpt
from trainers.config import load_config
from trainers.models import build_model
from trainers.optim import param_groups
from trainers.schedule import build_schedule

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def differences(a: Path, b: Path) -> set:
    """The dotted keys whose values differ between two recipes."""
    x, y = ckpt._flatten(config_to_dict(load_config(a))), ckpt._flatten(config_to_dict(load_config(b)))
    return {k for k in x if x[k] != y[k]}


@torch.no_grad()
def test_the_authors_resnet44():
    """convNet.pytorch's ResNet_cifar at depth 44: projection shortcuts where the shape changes, the last
    BatchNorm of each block at 0, fc ~ N(0, 0.01); He et al.'s parameter-free version stays the default."""
    torch.manual_seed(0)
    theirs = build_model("resnet44", 10, shortcut="projection", zero_init_residual=True, fc_init_std=0.01)
    he = build_model("resnet44", 10)
    assert sum(p.numel() for p in he.parameters()) == 658_586
    # two projections: 16→32 and 32→64 (1×1 conv, stride 2, + BN): 512 + 2,048 + 2·(32 + 64)
    assert sum(p.numel() for p in theirs.parameters()) == 658_586 + 512 + 2048 + 2 * (32 + 64)
    projections = [b.downsample for b in theirs.layers if b.downsample is not None]
    assert [(p[0].in_channels, p[0].out_channels, p[0].stride) for p in projections] == [(16, 32, (2, 2)),
                                                                                          (32, 64, (2, 2))]
    assert all(b.downsample is None for b in he.layers)
    assert all(float(b.bn2.weight.abs().sum()) == 0 for b in theirs.layers)  # 21 blocks
    assert all(bool((p[1].weight == 1).all()) for p in projections)  # the shortcut's BN is not zeroed
    assert 0.007 < float(theirs.fc.weight.std()) < 0.013 and float(theirs.fc.bias.abs().sum()) == 0
    # at initialisation each block is relu(shortcut(x))
    block, x = theirs.layers[7], torch.randn(2, 16, 8, 8)  # stage 2's first block: a projection
    assert torch.equal(block.eval()(x), torch.relu(block.shortcut(x)))
    # their weight decay: conv and linear weights only (optim.no_decay_bn_bias)
    decayed = {id(p) for p in param_groups(theirs, 1e-4, True)[0]["params"]}
    expected = {id(m.weight) for m in theirs.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert decayed == expected and len(expected) == 43 + 2 + 1


@torch.no_grad()
def test_torchvision_resnets_take_the_authors_init():
    model = build_model("resnet50", 10, zero_init_residual=True, fc_init_std=0.01)
    bottlenecks = [m for m in model.modules() if m.__class__.__name__ == "Bottleneck"]
    assert len(bottlenecks) == 16 and all(float(b.bn3.weight.abs().sum()) == 0 for b in bottlenecks)
    assert float(model.fc.bias.abs().sum()) == 0 and 0.008 < float(model.fc.weight.std()) < 0.012


@pytest.mark.parametrize("arch, options, message", [
    ("resnet50", dict(shortcut="pad"), "model.shortcut: resnet50 has projection shortcuts of its own"),
    ("smallnet", dict(shortcut="projection"), "model.shortcut: smallnet has no shortcuts"),
    ("smallnet", dict(zero_init_residual=True), "model.zero_init_residual: smallnet has no residual blocks"),
])
def test_model_options_that_do_not_apply_are_config_errors(arch, options, message):
    with pytest.raises(ConfigError, match=message):
        build_model(arch, 10, **options)


def test_every_recipe_loads():
    recipes = sorted(PIPELINES.glob("*.yaml"))
    assert len(recipes) >= 7
    for path in recipes:
        load_config(path)


def test_the_cifar10_recipe_is_the_papers_command_and_its_baseline_differs_only_in_m():
    ba, base = PIPELINES / "cifar10-resnet44-ba40-cutout.yaml", PIPELINES / "cifar10-resnet44-cutout-baseline.yaml"
    assert differences(ba, base) == {"data.num_views", "train.out_dir"}  # out_dir is runs/…-m${data.num_views}
    cfg = load_config(ba)
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    assert (d.batch_size, d.num_views, d.image_size, d.augment, d.pad, d.cutout, d.cutout_holes) == (
        64, 40, 32, "cifar", 4, 16, 1)
    assert list(d.mean) == [0.485, 0.456, 0.406] and list(d.std) == [0.229, 0.224, 0.225]
    assert not (d.rand_augment or d.auto_augment or d.trivial_augment or d.random_erase or d.color_jitter)
    assert (m.arch, m.shortcut, m.zero_init_residual, m.fc_init_std) == ("resnet44", "projection", True, 0.01)
    assert (o.lr, o.lr_scaling, o.momentum, o.nesterov, o.weight_decay, o.no_decay_bn_bias, o.label_smoothing) == (
        0.1, "none", 0.9, False, 1e-4, True, 0.0)
    assert (t.epochs, t.amp, t.mixup, t.cutmix, t.ema_decay) == (100, "off", 0.0, 0.0, 0.0)
    assert load_config(base).train.out_dir.endswith("-m1") and t.out_dir.endswith("-m40")
    # their regime in 100 epochs: 0.1 until epoch 81, then 0.01 to the end; no warm-up
    steps = 50_000 // 64
    lr = build_schedule(cfg, steps, world=1)
    assert lr.total_steps == 100 * steps and lr.warmup_steps == 0
    assert lr(0) == pytest.approx(0.1) and lr(81 * steps - 1) == pytest.approx(0.1)
    assert lr(81 * steps) == pytest.approx(0.01) and lr(lr.total_steps - 1) == pytest.approx(0.01)


def test_the_imagenet_recipes_state_the_authors_choices():
    base, randaug = PIPELINES / "imagenet-resnet50-ba4.yaml", PIPELINES / "imagenet-resnet50-ba4-randaug-ema.yaml"
    cfg = load_config(base)
    assert (cfg.schedule.warmup_epochs, cfg.optim.no_decay_bn_bias, cfg.model.zero_init_residual,
            cfg.model.fc_init_std, cfg.optim.lr, cfg.optim.reference_batch, list(cfg.schedule.milestones)) == (
        0, True, True, 0.01, 0.1, 256, [30, 60, 80])
    text = base.read_text()
    assert "Hoffer et al. 2019" not in text and "5-epoch warmup" not in text
    assert differences(base, randaug) == {"data.rand_augment", "data.random_erase", "train.ema_decay",
                                          "train.out_dir"}
    extra = load_config(randaug)
    assert (extra.data.rand_augment, extra.data.random_erase, extra.train.ema_decay) == ([2, 9], 0.25, 0.9998)
