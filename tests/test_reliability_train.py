"""Reliability of the trainer in one process: bad data, bad arguments, crashes, determinism.

Real JPEGs decoded by DALI on the CPU, the real trainer, real `python -m trainers.train` processes
where exit codes, stderr and signals matter. Every fault is checked against an uninterrupted
reference run of the same recipe: a run that was stopped (decode error, kill -9) and resumed must
end with bit-for-bit the reference weights. test_trainer.py already proves SIGTERM/SIGUSR1
pre-emption in one process, mid-epoch resume and a few one-line resume errors; not repeated here.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import last_checkpoint, tiny, write_yaml

from dali_ba import BatchAugmentLoader
from trainers import checkpoint as ckpt
from trainers.config import config_from_dict
from trainers.loop import run
from trainers.metrics import read_metrics
from trainers.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# Child trainers use as many torch threads as this process: float sums are then done in the same
# order, so a run split between a child and this process is bit-exact with one done here.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
TRAIN = [sys.executable, "-m", "trainers.train"]
STEPS = 16  # 64 images // B=8 = 8 steps per epoch, 2 epochs


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(config_from_dict(tiny(data, out))) == 0
    assert last_checkpoint(out)["step"] == STEPS
    return out


def copy_train(data: Path, tmp_path: Path) -> Path:
    train = tmp_path / "train"
    shutil.copytree(data / "train", train)
    return train


def file_at_step(train: Path, step: int, seed: int = 0) -> Path:
    """The first file the single-process loader reads at ``step`` of epoch 0."""
    loader = BatchAugmentLoader(train, batch_size=8, num_views=1, image_size=8, device="cpu", seed=seed)
    return Path(loader.dataset.files[loader.batch_indices(0, step)[0]])


def error_lines(stderr: str) -> list:
    """Our lines on stderr: without tqdm's bar and DALI's own C++ codec log ("[ERROR] [libjpeg...")."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith("train:") and "[libjpeg_turbo_decoder]" not in line]


# ----------------------------------------------------------------------------- bad data
def test_decode_error_saves_a_checkpoint_and_the_fixed_run_resumes_bit_exact(data, reference, tmp_path):
    train = copy_train(data, tmp_path)
    victim = file_at_step(train, 5)
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 3])  # truncated JPEG
    values = tiny(data, tmp_path / "run")
    values["data"]["train_root"] = str(train)
    config = write_yaml(values, tmp_path / "run.yaml")
    done = subprocess.run([*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot decode {victim}" in lines[0] and "training stopped after step 5" in lines[0]
    state = last_checkpoint(tmp_path / "run")
    assert state["step"] == 5 and (state["loader"][0]["epoch"], state["loader"][0]["step"]) == (0, 5)
    stopped = read_metrics(tmp_path / "run" / "metrics.jsonl", "event")[-1]
    assert stopped["event"] == "stopped" and stopped["reason"] == "decode_error" and str(victim) in stopped["message"]

    victim.write_bytes(original)  # the user replaces the file
    assert run(config_from_dict(values)) == 0
    resumed = last_checkpoint(tmp_path / "run")
    assert resumed["step"] == STEPS and same_weights(resumed["model"], last_checkpoint(reference)["model"])
    assert losses(tmp_path / "run") == losses(reference)


def test_decode_error_then_the_file_left_out_resumes_on_the_clean_list(data, tmp_path, capsys, monkeypatch):
    from dali_ba import cli

    monkeypatch.setattr(cli, "_COMMANDS", [c for c in cli._COMMANDS if c[0][0] == "data"])

    train = copy_train(data, tmp_path)
    victim = file_at_step(train, 3)
    victim.write_bytes(victim.read_bytes()[:200])  # truncated (text would risk DALI's crash, see verify.py)
    values = tiny(data, tmp_path / "run")
    values["data"]["train_root"] = str(train)
    config = write_yaml(values, tmp_path / "run.yaml")
    assert train_main(["--config", str(config)]) == 2
    assert str(victim) in capsys.readouterr().err
    assert last_checkpoint(tmp_path / "run")["step"] == 3

    clean = tmp_path / "clean.txt"
    assert cli.main(["data", "verify", str(train), "--write-clean-list", str(clean)]) == 1
    capsys.readouterr()
    assert train_main(["--config", str(config), f"data.train_list={clean}"]) == 0
    err = capsys.readouterr().err
    assert "warning: the training set changed" in err and "64 files then, 63 now" in err
    assert "restarts at step 3 of epoch 0" in err
    state = last_checkpoint(tmp_path / "run")
    assert state["step"] == 2 * (63 // 8) and state["loader"][0]["num_files"] == 63  # 7 steps per epoch now
    events = [r["event"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "event")]
    assert events[-3:] == ["start", "data_changed", "end"]
    trained = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    assert trained == list(range(1, 15))  # steps 1-3 before the stop, 4-14 after: none twice, none lost


def test_a_loader_state_dali_cannot_restore_resumes_in_the_same_data_order(data, tmp_path, capsys):
    """A DALI checkpoint that DALI refuses to restore (here: damaged bytes) does not stop the run:
    model, optimizer and step resume from the checkpoint, the data at the same step, fresh draws."""
    out = tmp_path / "run"
    assert run(config_from_dict(tiny(data, out, train={"max_steps": 3}))) == 0
    path = out / "checkpoints" / ckpt.LAST
    state = ckpt.load(path)
    state["loader"][0]["dali"] = b"not a DALI checkpoint"
    ckpt.save_atomic(state, path)
    capsys.readouterr()
    assert run(config_from_dict(tiny(data, out))) == 0
    err = capsys.readouterr().err
    assert "DALI could not restore the saved state" in err
    assert "continues at step 3 of epoch 0 in the same order" in err
    events = [r for r in read_metrics(out / "metrics.jsonl", "event") if r["event"] == "data_changed"]
    assert len(events) == 1 and "fresh augmentation draws" in events[0]["message"]
    trained = [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")]
    assert trained == list(range(1, STEPS + 1))  # none twice, none lost


def test_a_resume_with_other_augmentation_settings_is_one_line_and_exit_2(data, tmp_path, capsys):
    """DALI calls restoring a checkpoint into another graph undefined behaviour: refuse it."""
    values = tiny(data, tmp_path / "run", train={"max_steps": 3})
    values["data"].update(augment="imagenet")
    config = write_yaml(values, tmp_path / "run.yaml")
    assert train_main(["--config", str(config)]) == 0
    capsys.readouterr()
    assert train_main(["--config", str(config), "data.color_jitter=0.4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "color_jitter: saved 0.0, now 0.4" in err[0] and "start afresh" in err[0], err


def test_decode_error_during_validation_saves_and_stops(data, tmp_path, capsys):
    val = tmp_path / "val"
    shutil.copytree(data / "val", val)
    victim = val / "class_2" / "003.jpg"
    original = victim.read_bytes()
    victim.write_bytes(b"")
    values = tiny(data, tmp_path / "run")
    values["data"]["val_root"] = str(val)
    config = write_yaml(values, tmp_path / "run.yaml")
    assert train_main(["--config", str(config)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"validation: cannot decode {victim} (empty file (0 bytes))" in lines[0]
    assert last_checkpoint(tmp_path / "run")["step"] == 8  # the first evaluation is at the end of epoch 0
    victim.write_bytes(original)
    assert train_main(["--config", str(config)]) == 0
    # the failed evaluation is not repeated; the next one runs as scheduled
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")] == [16]


# ----------------------------------------------------------------------------- bad config / arguments
@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory) -> dict:
    """A real checkpoint (1 step), an older-format copy and a corrupt file."""
    root = tmp_path_factory.mktemp("ckpts")
    out = root / "run"
    assert run(config_from_dict(tiny(data, out, train={"max_steps": 1}))) == 0
    good = out / "checkpoints" / ckpt.LAST
    old = torch.load(good, weights_only=False)
    old["format"] = 0
    torch.save(old, root / "old.pt")
    (root / "corrupt.pt").write_bytes(good.read_bytes()[:1000])
    (root / "empty_run").mkdir()
    return {"run": out, "old": root / "old.pt", "corrupt": root / "corrupt.pt", "empty_run": root / "empty_run"}


@pytest.mark.slow
def test_every_bad_config_or_argument_is_one_line_without_traceback(data, checkpoints, tmp_path):
    base = tiny(data, tmp_path / "out")
    files = {"base": write_yaml(base, tmp_path / "base.yaml")}
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    files["typo"] = write_yaml({**base, "data": {**base["data"], "num_veiws": 2}}, tmp_path / "typo.yaml")
    odd_val = tmp_path / "odd_val"
    shutil.copytree(data / "val", odd_val)
    (odd_val / "class_3").rename(odd_val / "zebra")
    empty_class = tmp_path / "empty_class"
    shutil.copytree(data / "train", empty_class)
    (empty_class / "class_9").mkdir()
    other_config = write_yaml(tiny(data, checkpoints["run"]), tmp_path / "other.yaml")
    cfg, missing = str(files["base"]), str(tmp_path / "nope")
    verify_cli = [sys.executable, "-c", "import sys; from dali_ba import cli; cli._COMMANDS = [c for c in "
                  "cli._COMMANDS if c[0][0] in ('data', 'train')]; sys.exit(cli.main())"]
    cases = {  # name: (command, what the one line must say)
        "config file missing": ([*TRAIN, "--config", missing], "config file not found"),
        "invalid YAML": ([*TRAIN, "--config", str(tmp_path / "broken.yaml")], "not valid YAML"),
        "YAML not a mapping": ([*TRAIN, "--config", str(tmp_path / "list.yaml")], "expected a mapping"),
        "unknown key in file": ([*TRAIN, "--config", str(files["typo"])], "data.num_veiws: unknown key"),
        "unknown key override": ([*TRAIN, "--config", cfg, "optim.lr_sched=3"], "optim.lr_sched: unknown key"),
        "wrong type": ([*TRAIN, "--config", cfg, "data.batch_size=many"], "data.batch_size"),
        "wrong type (bool)": ([*TRAIN, "--config", cfg, "train.tensorboard=maybe"], "train.tensorboard"),
        "num_views 0": ([*TRAIN, "--config", cfg, "data.num_views=0"], "data.num_views: expected a value >= 1; got 0"),
        "num_views negative": ([*TRAIN, "--config", cfg, "data.num_views=-3"], "data.num_views"),
        "override without =": ([*TRAIN, "--config", cfg, "data.num_views"], "expected key=value"),
        "epochs 0": ([*TRAIN, "--config", cfg, "train.epochs=0"], "train.epochs"),
        "dist timeout 0": ([*TRAIN, "--config", cfg, "train.dist_timeout_s=0"], "train.dist_timeout_s"),
        "train_root missing": (
            [*TRAIN, "--config", cfg, f"data.train_root={missing}"],
            f"image folder not found: {missing}",
        ),
        "val_root missing": (
            [*TRAIN, "--config", cfg, f"data.val_root={missing}"],
            f"image folder not found: {missing}",
        ),
        "val classes differ": ([*TRAIN, "--config", cfg, f"data.val_root={odd_val}"], "only in val ['zebra']"),
        "empty class folder": ([*TRAIN, "--config", cfg, f"data.train_root={empty_class}"], "class_9"),
        "train_list missing": ([*TRAIN, "--config", cfg, f"data.train_list={missing}.txt"], "file list not found"),
        "batch larger than shard": ([*TRAIN, "--config", cfg, "data.batch_size=65"], "needs at least 65 images"),
        "num_classes too small": (
            [*TRAIN, "--config", cfg, "model.num_classes=3"],
            "model.num_classes: 3 is fewer than the 4",
        ),
        "resume missing": ([*TRAIN, "--config", cfg, "--resume", missing], f"train.resume: {missing} does not exist"),
        "resume without checkpoint": (
            [*TRAIN, "--config", cfg, "--resume", str(checkpoints["empty_run"])],
            "no checkpoint in",
        ),
        "resume other config": (
            [*TRAIN, "--config", str(other_config), "data.num_views=4", "optim.lr=0.5"],
            "data.num_views: checkpoint 2, now 4; optim.lr: checkpoint 0.2, now 0.5",
        ),
        "resume older format": (
            [*TRAIN, "--config", cfg, "--resume", str(checkpoints["old"])],
            "has checkpoint format 0, written by an older dali-ba",
        ),
        "resume corrupt file": (
            [*TRAIN, "--config", cfg, "--resume", str(checkpoints["corrupt"])],
            "cannot read checkpoint",
        ),
        "dali-ba train config missing": ([*verify_cli, "train", "--config", missing], "config file not found"),
        "dali-ba verify root missing": ([*verify_cli, "data", "verify", missing], f"image folder not found: {missing}"),
    }

    def attempt(item):
        name, (command, expected) = item
        return name, expected, subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, cases.items()))
    for name, expected, done in results:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, (name, done.returncode, done.stderr[-1500:])
        assert len(lines) == 1 and "Traceback" not in done.stderr, (name, done.stderr[-1500:])
        assert expected in lines[0], (name, lines[0])
        assert "error:" in lines[0], (name, lines[0])
    assert not (tmp_path / "out").exists()  # nothing was started


# ----------------------------------------------------------------------------- crashes
KILLING_WORKER = textwrap.dedent('''
    import io, os, signal, sys
    import torch
    from trainers.train import main

    kill_at, saves, real_save = int(os.environ["KILL_AT_SAVE"]), [0], torch.save

    def dying_save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == kill_at:  # write half of the checkpoint, make it durable, then die
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    sys.exit(main(sys.argv[1:]))
''')


def test_kill_9_in_the_middle_of_writing_a_checkpoint_keeps_the_previous_one(data, reference, tmp_path):
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, train={"checkpoint_every": 2}), tmp_path / "run.yaml")
    worker = tmp_path / "worker.py"
    worker.write_text(KILLING_WORKER)
    done = subprocess.run(
        [sys.executable, str(worker), "--config", str(config)],
        cwd=REPO,
        env={**ENV, "KILL_AT_SAVE": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    leftovers = list((out / "checkpoints").glob(".last.pt.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written file
    assert last_checkpoint(out)["step"] == 4  # saves at steps 2, 4, then killed while writing step 6

    assert run(config_from_dict(tiny(data, out, train={"checkpoint_every": 2}))) == 0  # resume=auto
    assert not list((out / "checkpoints").glob(".*tmp*"))  # the stale temporary is gone
    starts = [r for r in read_metrics(out / "metrics.jsonl", "event") if r["event"] == "start"]
    assert starts[-1]["step"] == 4
    assert same_weights(last_checkpoint(out)["model"], last_checkpoint(reference)["model"])


def test_a_metrics_line_torn_by_a_kill_is_skipped_and_the_next_run_starts_a_new_line(tmp_path):
    from trainers.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "st')  # killed mid-write
    log = MetricsLogger(path, enabled=True)
    log.log("train", 2, 0.5, loss=1.5)
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path, "train")] == [(1, 2.0), (2, 1.5)]
    assert path.read_text().splitlines()[-1].startswith('{"kind": "train", "step": 2')


def _metrics_lines(out: Path) -> list:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _last_train_step(lines: list) -> int:
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # torn by a kill
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return steps[-1] if steps else 0


@pytest.mark.slow
def test_kill_9_at_random_moments_never_corrupts_and_the_run_still_ends_bit_exact(data, reference, tmp_path):
    """Kill the trainer with SIGKILL at random moments (checkpoint every step); after each kill,
    last.pt loads and the next run resumes from it; the finished run equals the reference."""
    rng = random.Random(20240607)
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, train={"checkpoint_every": 1}), tmp_path / "run.yaml")
    trials = []
    previous = 0  # the step of last.pt before this trial
    for _ in range(4):
        target = min(previous + rng.randint(1, 3), 12)
        seen = len(_metrics_lines(out))  # look only at what this run appends
        proc = subprocess.Popen(
            [*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 180
            while _last_train_step(_metrics_lines(out)[seen:]) < target and proc.poll() is None:
                assert time.monotonic() < deadline, "the trainer made no progress"
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))  # anywhere in a step: forward, backward, logging, saving
            proc.kill()
        finally:
            proc.wait(timeout=60)
        new = _metrics_lines(out)[seen:]
        start = json.loads(next(line for line in new if '"event": "start"' in line))
        assert start["step"] == previous  # this run resumed from the previous kill's checkpoint
        state_step = (
            last_checkpoint(out)["step"] if (out / "checkpoints" / ckpt.LAST).exists() else 0
        )  # never half a file
        last_step = max(previous, _last_train_step(new))  # a run resumed at its end logs no train line
        assert previous <= state_step <= last_step
        trials.append({"killed_after_step": last_step, "last_pt_step": state_step})
        previous = state_step
        if state_step == STEPS:
            break  # on a quiet machine the run can outrun the kill and finish: nothing left to interrupt
    print("\nkill -9 trials:", trials)
    done = subprocess.run(
        [*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    final = last_checkpoint(out)
    assert final["step"] == STEPS and same_weights(final["model"], last_checkpoint(reference)["model"])
    assert losses(out) == losses(reference)  # the re-run steps logged the same losses again


# ----------------------------------------------------------------------------- determinism
@pytest.mark.slow
def test_same_config_and_seed_give_the_same_loss_curve_in_separate_processes(data, tmp_path):
    runs = {"a": 0, "a_again": 0, "other_seed": 1}
    configs = {
        name: write_yaml(
            tiny(
                data,
                tmp_path / name,
                train={"seed": seed, "max_steps": 10},
                data={"augment": "imagenet", "color_jitter": 0.3},
            ),
            tmp_path / f"{name}.yaml",
        )
        for name, seed in runs.items()
    }

    def train(name):
        return subprocess.run(
            [*TRAIN, "--config", str(configs[name])], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
        )

    with ThreadPoolExecutor(3) as pool:
        for done in pool.map(train, runs):
            assert done.returncode == 0, done.stderr[-2000:]
    curve = {name: losses(tmp_path / name) for name in runs}
    assert len(curve["a"]) == 10 and curve["a"] == curve["a_again"]
    assert curve["a"] != curve["other_seed"]
    evals = {name: read_metrics(tmp_path / name / "metrics.jsonl", "eval")[-1]["val_loss"] for name in runs}
    assert evals["a"] == evals["a_again"]
    assert same_weights(last_checkpoint(tmp_path / "a")["model"], last_checkpoint(tmp_path / "a_again")["model"])
