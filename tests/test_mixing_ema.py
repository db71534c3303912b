"""Mixup/CutMix on the M·B batch, the weight EMA, and test-time averaging of logits: the pieces on
their own, and in real training runs on JPEGs decoded by DALI (tiny config, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import last_checkpoint, tiny

from dali_ba.errors import ConfigError
from trainers import checkpoint as ckpt
from trainers import dist as tdist
from trainers.config import config_from_dict
from trainers.engine import build_engine
from trainers.evaluate import evaluate, view_log_probs
from trainers.loop import run
from trainers.metrics import read_metrics
from trainers.mixing import Mixer

B, M, C, SIZE = 6, 4, 5, 12


def indexed_batch():
    """Row r = b·M + v is filled with r + 1 (so a mix reveals its partner); label = b % C."""
    rows = torch.arange(B * M, dtype=torch.float32) + 1
    images = rows.view(-1, 1, 1, 1).expand(B * M, 3, SIZE, SIZE).contiguous()
    labels = (torch.arange(B) % C).repeat_interleave(M)
    return images, labels


@pytest.mark.parametrize("mixup, cutmix", [(1.0, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_rows_pair_other_images_and_targets_sum_to_one(mixup, cutmix):
    images, labels = indexed_batch()
    mixer = Mixer(mixup, cutmix, 0.5, C, B, M, seed=0, rank=0)
    cut_share, lams = [], []
    for step in range(40):
        draws = mixer.draws(step, SIZE, SIZE)
        mixed, targets = mixer(images, labels, step)
        assert mixed.shape == images.shape and targets.shape == (B * M, C)
        assert torch.allclose(targets.sum(dim=1), torch.ones(B * M))
        partners = draws.partners
        assert sorted(partners) == list(range(B * M))  # a permutation: every row is a partner once
        assert all(p // M != r // M for r, p in enumerate(partners))  # never a view of the same image
        assert all(p % M == r % M for r, p in enumerate(partners))  # view v with view v
        for r, p in enumerate(partners):
            own, other, lam = r + 1.0, p + 1.0, float(draws.lam[r])
            pixels = mixed[r, 0]
            if draws.cut[r]:  # the pasted box holds the partner's pixels, the rest the row's own
                from_partner = pixels == other
                assert bool(((pixels == own) | from_partner).all())
                assert float(from_partner.float().mean()) == pytest.approx(1 - lam, abs=1e-6)
                t, b, left, right = draws.boxes[r]
                assert int(from_partner.sum()) == (b - t) * (right - left)
            else:
                assert torch.allclose(pixels, torch.full_like(pixels, lam * own + (1 - lam) * other), atol=1e-5)
            expected = torch.zeros(C)
            expected[labels[r]] += lam
            expected[labels[p]] += 1 - lam
            assert torch.allclose(targets[r], expected, atol=1e-6)
        cut_share.append(draws.cut.mean())
        lams.append(draws.lam)
        # the views of an image get their own partners (all four equal: (1/5)³ per image)
        assert sum(len({partners[b * M + v] // M for v in range(M)}) == 1 for b in range(B)) < B
    expected_cut = {(1.0, 0.0): 0.0, (0.0, 1.0): 1.0, (0.4, 1.0): 0.5}[(mixup, cutmix)]
    assert np.mean(cut_share) == pytest.approx(expected_cut, abs=0.1)
    if mixup == 1.0:  # Beta(1, 1) is uniform: mean 1/2
        assert np.mean(lams) == pytest.approx(0.5, abs=0.05)


def test_mixing_draws_are_a_function_of_seed_rank_and_step():
    a = Mixer(0.2, 1.0, 0.5, C, B, M, seed=3, rank=0)
    same = Mixer(0.2, 1.0, 0.5, C, B, M, seed=3, rank=0).draws(7, SIZE, SIZE)
    assert np.array_equal(a.draws(7, SIZE, SIZE).partners, same.partners)
    assert np.array_equal(a.draws(7, SIZE, SIZE).lam, same.lam)
    for other in (a.draws(8, SIZE, SIZE), Mixer(0.2, 1.0, 0.5, C, B, M, seed=3, rank=1).draws(7, SIZE, SIZE),
                  Mixer(0.2, 1.0, 0.5, C, B, M, seed=4, rank=0).draws(7, SIZE, SIZE)):
        assert not np.array_equal(other.lam, same.lam)


def _engine(data, tmp_path, **train):
    values = tiny(data, tmp_path / "run", train=train)
    cfg = config_from_dict(values)
    torch.manual_seed(0)
    return cfg, build_engine(cfg, tdist.DistEnv(), num_classes=4)


def test_ema_is_the_exponential_average_of_the_weights_after_each_step(data, tmp_path):
    decay = 0.8
    cfg, engine = _engine(data, tmp_path, ema_decay=decay, mixup=0.2)
    snapshots = [{k: v.double().clone() for k, v in engine.model.state_dict().items()}]
    generator = torch.Generator().manual_seed(1)
    n = cfg.data.batch_size * cfg.data.num_views
    for step in range(5):
        images = torch.randn(n, 3, 24, 24, generator=generator)
        labels = torch.randint(0, 4, (n,), generator=generator)
        engine.step(images, labels, lr=0.1, step=step)
        snapshots.append({k: v.double().clone() for k, v in engine.model.state_dict().items()})
    k = len(snapshots) - 1
    averaged = engine.ema.state_dict()
    for name, value in averaged.items():
        if not value.is_floating_point():  # num_batches_tracked: copied
            assert torch.equal(value, engine.model.state_dict()[name]), name
            continue
        # ema_k = d^k·w_0 + Σ_i (1 − d)·d^(k−i)·w_i: the weights after each step, and the initial ones
        direct = decay ** k * snapshots[0][name] + sum((1 - decay) * decay ** (k - i) * snapshots[i][name]
                                                       for i in range(1, k + 1))
        assert torch.allclose(value.double(), direct, rtol=1e-5, atol=1e-6), name
    moved = [name for name, v in averaged.items() if v.is_floating_point() and not torch.equal(
        v, engine.model.state_dict()[name])]
    assert moved  # the average lags the weights
    assert not engine.ema.module.training and not any(p.requires_grad for p in engine.ema.module.parameters())


def test_mixing_ema_and_the_authors_model_options_train_and_resume_bit_exactly(data, tmp_path):
    """16 steps straight == 5 steps, stop, resume, 11 steps: the model, the optimizer and the EMA,
    bit for bit, with mixup + CutMix, view chunks and diagnostics on (the probes see soft targets)."""
    extra = dict(train={"mixup": 0.2, "cutmix": 1.0, "ema_decay": 0.9, "view_chunks": 2},
                 model={"arch": "resnet8", "shortcut": "projection", "zero_init_residual": True, "fc_init_std": 0.01},
                 optim={"no_decay_bn_bias": True, "label_smoothing": 0.1}, diagnostics={"every": 3})
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(config_from_dict(tiny(data, straight, **extra))) == 0
    first = tiny(data, split, **extra)
    first["train"]["max_steps"] = 5
    assert run(config_from_dict(first)) == 0
    assert run(config_from_dict(tiny(data, split, **extra))) == 0
    a, b = last_checkpoint(straight), last_checkpoint(split)
    assert a["step"] == b["step"] == 16
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])
    loss = lambda out: {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")}  # noqa: E731
    assert loss(straight) == loss(split) and all(np.isfinite(list(loss(straight).values())))
    evals = read_metrics(straight / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [8, 16]
    for r in evals:
        assert 0 <= r["val_top1_ema"] <= r["val_top5_ema"] <= 100 and r["val_loss_ema"] > 0
    # a different mixing or EMA makes a different run: refused, one line, naming the key
    with pytest.raises(ckpt.ResumeError, match="train.ema_decay: checkpoint 0.9, now 0.5") as info:
        run(config_from_dict(tiny(data, split, **{**extra, "train": {**extra["train"], "ema_decay": 0.5}})))
    assert "\n" not in str(info.value)


class _Views:
    """A stand-in EvalLoader: fixed [b, V, C, H, W] batches."""

    def __init__(self, batches, views):
        self.batches, self.views = batches, views

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("average", ["softmax", "logits"])
def test_test_time_views_average_softmaxes_or_the_authors_logits(average):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    images, labels = torch.randn(5, 4, 3, 4, 4), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        logits = model(images.flatten(0, 1)).view(5, 4, 3)
    probs = logits.mean(1).softmax(1) if average == "logits" else logits.softmax(2).mean(1)
    assert torch.allclose(view_log_probs(logits.flatten(0, 1), 4, average).exp(), probs, atol=1e-6)
    out = evaluate(model, _Views([(images, labels)], 4), tdist.DistEnv(),
                   lambda: torch.autocast("cpu", enabled=False), average=average, ema=model)
    expected_loss = float(-probs.log()[torch.arange(5), labels].mean())
    assert out["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert out["val_top1"] == pytest.approx(100 * float((probs.argmax(1) == labels).float().mean()))
    assert out["val_loss_ema"] == out["val_loss"] and out["val_images"] == 5 and out["val_views"] == 4
    if average == "logits":  # the two rules differ on these views
        other = logits.softmax(2).mean(1)
        assert not torch.allclose(other, probs)


@pytest.mark.parametrize("key, value, message", [
    ("train.mixup", -0.1, "train.mixup: expected a value >= 0.0"),
    ("train.ema_decay", 1.0, "train.ema_decay: expected 0 <= value < 1"),
    ("train.mixup_switch_prob", 2.0, "train.mixup_switch_prob: expected 0 <= value <= 1"),
    ("eval.average", "mean", "eval.average: expected one of softmax, logits"),
    ("model.shortcut", "B", "model.shortcut: expected one of auto, pad, projection"),
])
def test_bad_trainer_values_are_one_line_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [f"{key}={value}"])


def test_mixing_needs_two_images_per_step():
    with pytest.raises(ConfigError, match="data.batch_size must be at least 2; got 1"):
        config_from_dict({"data": {"batch_size": 1}, "train": {"cutmix": 1.0}})
