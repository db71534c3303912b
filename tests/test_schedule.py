"""The LR schedule is a pure function of the step: warmup, decay, scaling rules, LEGW."""
from __future__ import annotations

import math

import pytest

from trainers.config import config_from_dict
from trainers.schedule import LRSchedule, batch_ratio, build_schedule, scaled_lr, total_steps


def cfg(**sections):
    return config_from_dict(sections)


def test_step_schedule_with_linear_warmup():
    s = LRSchedule(peak_lr=0.4, total_steps=90, warmup_steps=5, kind="step", milestones=(30, 60, 80), gamma=0.1)
    assert [s(i) for i in range(5)] == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4])
    assert s(5) == pytest.approx(0.4) and s(29) == pytest.approx(0.4)
    assert s(30) == pytest.approx(0.04) and s(59) == pytest.approx(0.04)
    assert s(60) == pytest.approx(0.004) and s(80) == pytest.approx(0.0004) and s(89) == pytest.approx(0.0004)


def test_cosine_decays_from_peak_to_min_lr():
    s = LRSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, kind="cosine", min_lr=0.1)
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.55)  # half way through the decay
    lrs = [s(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert 0.1 < s(99) < 0.101 and s(100) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)


def test_scaling_rules_relative_to_the_reference_batch():
    assert scaled_lr(0.1, "none", 4.0) == 0.1
    assert scaled_lr(0.1, "linear", 4.0) == pytest.approx(0.4)
    assert scaled_lr(0.1, "sqrt", 4.0) == pytest.approx(0.2)
    # global batch counts unique images (B·world), or samples (B·M·world) with scale_with_views
    assert batch_ratio(256, batch_size=32, num_views=4, world=8, with_views=False) == 1.0
    assert batch_ratio(256, batch_size=32, num_views=4, world=8, with_views=True) == 4.0


def test_build_schedule_from_config_epochs_to_steps():
    c = cfg(data={"batch_size": 32, "num_views": 4},
            optim={"lr": 0.1, "lr_scaling": "linear", "reference_batch": 256},
            schedule={"kind": "step", "milestones": [30, 60, 80], "warmup_epochs": 5},
            train={"epochs": 90})
    s = build_schedule(c, steps_per_epoch=10, world=16)  # global 512 images: k = 2
    assert s.peak_lr == pytest.approx(0.2) and s.total_steps == 900
    assert s.warmup_steps == 50 and s.milestones == (300, 600, 800)


def test_ba_keeps_the_baseline_schedule_unless_asked():
    common = dict(
        optim={"lr": 0.1, "reference_batch": 64}, schedule={"kind": "cosine", "warmup_epochs": 1}, train={"epochs": 2}
    )
    base = build_schedule(cfg(data={"batch_size": 64, "num_views": 1}, **common), 100, 1)
    ba = build_schedule(cfg(data={"batch_size": 64, "num_views": 4}, **common), 100, 1)
    assert base == ba
    linear_views = build_schedule(
        cfg(
            data={"batch_size": 64, "num_views": 4},
            optim={"lr": 0.1, "reference_batch": 64, "lr_scaling": "linear", "scale_with_views": True},
            schedule=common["schedule"],
            train=common["train"],
        ),
        100,
        1,
    )
    assert linear_views.peak_lr == pytest.approx(0.4)


def test_legw_lengthens_warmup_with_the_batch():
    c = cfg(
        data={"batch_size": 64, "num_views": 1},
        optim={"lr": 0.1, "lr_scaling": "sqrt", "reference_batch": 64},
        schedule={"warmup_epochs": 0.5, "warmup": "legw"},
        train={"epochs": 10},
    )
    one = build_schedule(c, steps_per_epoch=100, world=1)
    four = build_schedule(c, steps_per_epoch=25, world=4)  # 4× the global batch, 4× fewer steps
    assert one.warmup_steps == 50 and four.warmup_steps == 50  # warmup epochs × 4
    assert four.peak_lr == pytest.approx(0.2)
    plain = build_schedule(
        cfg(
            data={"batch_size": 64}, optim={"reference_batch": 64}, schedule={"warmup_epochs": 0.5, "warmup": "linear"}
        ),
        steps_per_epoch=24,
        world=4,
    )
    assert plain.warmup_steps == 12  # plain linear warmup: 0.5 epoch whatever the batch


def test_total_steps_and_fractional_epochs():
    assert total_steps(2, 937) == 1874
    assert total_steps(0.17, 937) == math.ceil(0.17 * 937)
    assert total_steps(1e-6, 10) == 1


def test_max_steps_does_not_change_the_schedule():
    a = build_schedule(cfg(train={"epochs": 3}), 50, 1)
    b = build_schedule(cfg(train={"epochs": 3, "max_steps": 20}), 50, 1)
    assert a == b
