"""The trainer end to end in one process: real JPEGs decoded by DALI on the CPU, a tiny network.

Outputs, exact mid-epoch resume (bit for bit), SIGTERM pre-emption, resume errors, `dali-ba train`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import last_checkpoint, tiny, write_yaml

from trainers import checkpoint as ckpt
from trainers.config import config_from_dict, load_config
from trainers.loop import PREEMPTED, run
from trainers.metrics import read_metrics
from trainers.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def test_run_writes_config_metrics_and_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    cfg = config_from_dict(tiny(data, out, diagnostics={"every": 4}, eval={"views": 2}))
    assert run(cfg) == 0
    assert load_config(out / "config.yaml") == cfg
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))
    for key in ("epoch", "loss", "lr", "images_per_s", "samples_per_s", "data_time", "step_time"):
        assert all(isinstance(r[key], (int, float)) for r in train), key
    assert train[-1]["samples_per_s"] == pytest.approx(2 * train[-1]["images_per_s"], rel=1e-4)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16]  # each epoch end
    assert all(
        r["val_images"] == 20 and r["val_views"] == 2 and 0 <= r["val_top1"] <= r["val_top5"] <= 100 for r in evals
    )
    diag = [r for r in rows if r["kind"] == "diag"]
    assert [r["step"] for r in diag] == [4, 8, 12, 16]
    assert {r["probe"] for r in diag} == {"view", "half"}  # single process, M > 1: alternating probes
    assert all(r["view_grad_var"] >= 0 for r in diag if r["probe"] == "view")
    assert all("aug_noise_trace" in r for r in diag if r["probe"] == "view")
    assert all(r["noise_pair"] == "half" and "noise_scale" in r for r in diag if r["probe"] == "half")
    assert [r["event"] for r in rows if r["kind"] == "event"] == ["start", "end"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert rows[0]["git_commit"] == head and isinstance(rows[0]["git_dirty"], bool)  # results trace to the code

    state = last_checkpoint(out)
    assert state["step"] == 16 and state["world_size"] == 1 and state["classes"] == [f"class_{i}" for i in range(4)]
    assert (state["loader"][0]["epoch"], state["loader"][0]["step"]) == (2, 0)  # epoch 1 done: epoch 2 next
    assert (out / "checkpoints" / ckpt.BEST).is_file()
    assert not list((out / "checkpoints").glob(".*tmp*"))  # no temporary files left behind


def test_resume_mid_epoch_is_bit_exact(data, tmp_path):
    """16 steps straight == 5 steps, stop (max_steps), resume, 11 steps: same weights, bit for bit.

    Step 5 is mid-epoch (8 steps per epoch), so this resumes the DALI pipeline from its checkpoint.
    Diagnostics (an extra probe backward) and view_chunks (gradient accumulation) are on, to show
    they do not perturb the trajectory either."""
    extra = dict(diagnostics={"every": 3}, train={"view_chunks": 2})
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(config_from_dict(tiny(data, straight, **extra))) == 0
    first = tiny(data, split, **extra)
    first["train"]["max_steps"] = 5
    assert run(config_from_dict(first)) == 0
    assert last_checkpoint(split)["step"] == 5 and last_checkpoint(split)["loader"][0]["step"] == 5
    assert run(config_from_dict(tiny(data, split, **extra))) == 0

    a, b = last_checkpoint(straight), last_checkpoint(split)
    assert a["step"] == b["step"] == 16
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # the logged losses of the resumed steps are the straight run's too
    loss = lambda out: {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")}  # noqa: E731
    assert loss(straight) == loss(split)
    events = [r for r in read_metrics(split / "metrics.jsonl", "event")]
    assert events[-2]["event"] == "start" and events[-2]["resumed_from"].endswith("last.pt")


def test_resume_errors_are_one_line_and_name_the_problem(data, tmp_path, capsys):
    config = write_yaml(tiny(data, tmp_path / "run", train={"max_steps": 2}), tmp_path / "tiny.yaml")
    missing = tmp_path / "no-such-run"
    assert train_main(["--config", str(config), "--resume", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "does not exist" in err

    assert train_main(["--config", str(config)]) == 0
    capsys.readouterr()
    assert train_main(["--config", str(config)]) == 0  # resume=auto of a finished run: nothing to train
    again = capsys.readouterr().out
    assert "done: step 2/16" in again and "val_top1" in again
    assert train_main(["--config", str(config), "data.num_views=4", "model.arch=resnet8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "data.num_views: checkpoint 2, now 4" in err and "model.arch: checkpoint 'smallnet', now 'resnet8'" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_main(["--config", str(config), f"train.resume={empty}"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_view_chunks_and_test_time_views(data, tmp_path, amp):
    """The GPU-oriented options also run on the CPU (fp16 with its gradient scaler)."""
    out = tmp_path / amp
    values = tiny(
        data,
        out,
        train={"amp": amp, "channels_last": True, "view_chunks": 2, "max_steps": 4},
        eval={"views": 2},
        diagnostics={"every": 2},
    )
    assert run(config_from_dict(values)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["loss"] is not None for r in rows if r["kind"] == "train")
    assert [r["val_views"] for r in rows if r["kind"] == "eval"] == [2]
    state = last_checkpoint(out)
    assert state["scaler"] != {} if amp == "fp16" else state["scaler"] == {}


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_training_step_runs_the_model_in_the_amp_dtype(data, tmp_path, amp, dtype):
    """train.amp really autocasts the forward pass of the trainer's step (its convolutions run in
    the chosen dtype) and fp16 scales the loss; the weights stay float32."""
    from trainers import dist as tdist
    from trainers.engine import build_engine

    cfg = config_from_dict(tiny(data, tmp_path / "run", train={"amp": amp, "view_chunks": 2}))
    engine = build_engine(cfg, tdist.DistEnv(), num_classes=4)
    seen = []
    engine.model.features[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images, labels = torch.randn(16, 3, 24, 24), torch.arange(16) % 4
    loss, _ = engine.step(images, labels, lr=0.1, step=0)
    assert seen == [dtype, dtype]  # one forward per view chunk
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    assert engine.scaler.is_enabled() == (amp == "fp16")


def test_tensorboard_without_the_package_is_a_config_error(data, tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    config = write_yaml(tiny(data, tmp_path / "run", train={"tensorboard": True}), tmp_path / "tb.yaml")
    assert train_main(["--config", str(config)]) == 2
    assert "train.tensorboard: needs the tensorboard package" in capsys.readouterr().err


def test_an_undecodable_file_stops_the_run_with_its_name(data, tmp_path, capsys):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(data / "train", train)
    # A truncated JPEG: DALI 2.4's CPU decoder can crash the process (not raise) on non-image
    # bytes inside a batch now and then (docs/reliability.md), so tests use a clean failure mode.
    good = next((train / "class_2").glob("*.jpg"))
    bad = train / "class_2" / "broken.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    values = tiny(data, tmp_path / "run", train={"epochs": 1})
    values["data"]["train_root"] = str(train)
    assert train_main(["--config", str(write_yaml(values, tmp_path / "bad.yaml"))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (the rest: tqdm)
    assert len(errors) == 1 and "broken.jpg" in errors[0]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max([r["step"] for r in rows if r["kind"] == "train"], default=0)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_exits_0_and_the_run_resumes(data, tmp_path, signum):
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, train={"epochs": 1000, "max_steps": 40}), tmp_path / "tiny.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "trainers.train", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _steps_logged(out) >= 3, 120, proc)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "pre-empted" in stdout and (out / PREEMPTED).is_file()
    state = last_checkpoint(out)  # loadable
    stopped = state["step"]
    assert 3 <= stopped < 40
    events = read_metrics(out / "metrics.jsonl", "event")
    assert events[-1]["event"] == "preempted" and events[-1]["step"] == stopped
    assert events[-1]["signal"] == signal.Signals(signum).name
    if signum != signal.SIGTERM:
        return  # resuming is the same whichever signal stopped the run

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / PREEMPTED).exists()  # removed at the start of the resumed run
    assert last_checkpoint(out)["step"] == 40
    starts = [r for r in read_metrics(out / "metrics.jsonl", "event") if r["event"] == "start"]
    assert starts[-1]["step"] == stopped


def test_dali_ba_train_cli(data, tmp_path, capfd):
    from dali_ba.cli import main as cli_main
    from dali_ba.train_launcher import build_command

    assert build_command("c.yaml", ["a=1"]) == [sys.executable, "-m", "trainers.train", "--config", "c.yaml", "a=1"]
    two = build_command("c.yaml", [], nproc=2)
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cli_main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capfd.readouterr().err
    assert cli_main(["train", "--config", str(tmp_path / "missing.yaml"), "--nproc", "0"]) == 2


@pytest.mark.slow
def test_dali_ba_train_runs_the_trainer(data, tmp_path):
    config = write_yaml(tiny(data, tmp_path / "run"), tmp_path / "tiny.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-c", "import sys; from dali_ba.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*cli, "train", "--config", str(config), "train.max_steps=3", "data.num_views=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: step 3/16" in done.stdout and "val_top1" in done.stdout
    assert last_checkpoint(tmp_path / "run")["config"]["data"]["num_views"] == 1


def test_compiled_training_follows_the_eager_run_and_saves_plain_weights(data, tmp_path):
    """train.compile=true (torch.compile, inductor on the CPU): the same training and validation
    losses as eager up to float rounding, and a checkpoint an eager run loads (no `_orig_mod.` keys)."""
    losses, evals = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        assert run(config_from_dict(tiny(data, out, train={"compile": compiled}, diagnostics={"every": 4}))) == 0
        rows = read_metrics(out / "metrics.jsonl")
        losses[compiled] = [r["loss"] for r in rows if r["kind"] == "train"]
        evals[compiled] = [r["val_loss"] for r in rows if r["kind"] == "eval"]
    assert len(losses[True]) == len(losses[False]) == 16
    assert losses[True] == pytest.approx(losses[False], rel=1e-3, abs=1e-4)
    assert len(evals[True]) == len(evals[False]) == 2
    assert evals[True] == pytest.approx(evals[False], rel=1e-3, abs=1e-4)
    eager, compiled = last_checkpoint(tmp_path / "compile-False"), last_checkpoint(tmp_path / "compile-True")
    assert eager["model"].keys() == compiled["model"].keys()
    for key, value in eager["model"].items():
        assert torch.allclose(value.float(), compiled["model"][key].float(), rtol=1e-3, atol=1e-4), key
