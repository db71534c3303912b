"""Runs that would lose steps, or train wrongly, without saying so: Ctrl-C, a loss that becomes NaN,
two runs on one folder, a disk that fills up, a crafted checkpoint, repeated overrides.

Real `python -m trainers.train` / `dali-ba train` processes on real JPEGs, real signals, a real
file-size limit standing in for a full disk, a real pickle payload. Where a stopped run is compared
with an uninterrupted one, child processes use this process's number of torch threads, so float
sums are done in the same order and the weights compare bit for bit.
"""
from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import last_checkpoint, tiny, write_yaml

from dali_ba import BatchAugmentLoader
from dali_ba.errors import DecodeError, LoaderOutOfMemory
from trainers import checkpoint as ckpt
from trainers.config import config_from_dict
from trainers.loop import PREEMPTED, run
from trainers.metrics import MetricsLogger, read_metrics
from trainers.nonfinite import NonFiniteGuard
from trainers.run_lock import RunDirInUse, RunLock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
TRAIN = [sys.executable, "-m", "trainers.train"]
CLI = [sys.executable, "-m", "dali_ba.cli"]


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("train:")]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def train_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum('"kind": "train"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_a_loss_that_becomes_nan_stops_with_a_checkpoint_of_the_last_finite_step(data, tmp_path, amp):
    """An LR of 1e5 makes a step non-finite within a few steps (fp16: a NaN loss; fp32: gradients
    and BatchNorm statistics that overflow). The run skips it, saves and stops with one line naming
    the step and the value; the checkpoint holds exactly the weights of the steps before it."""
    out = tmp_path / "run"
    values = tiny(data, out, optim={"lr": 1e5, "reference_batch": 8}, train={"amp": amp})
    config = write_yaml(values, tmp_path / "run.yaml")
    done = subprocess.run([*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    found = re.search(r"not finite at step (\d+) \(loss ([^)]+)\)", line)
    assert found and "Traceback" not in done.stderr, line
    bad_step = int(found.group(1))
    assert f"training stopped after step {bad_step} and saved {out / 'checkpoints' / 'last.pt'}" in line
    state = last_checkpoint(out)
    assert state["step"] == bad_step and all_finite(state["model"])
    assert all(all_finite(s) for s in state["optimizer"]["state"].values())
    stopped = read_metrics(out / "metrics.jsonl", "event")[-1]
    assert stopped["event"] == "stopped" and stopped["reason"] == "nonfinite_loss"
    # The step that was not finite left no trace: a run that stopped just before it has the same state.
    assert bad_step > 1
    reference = tmp_path / "reference"
    assert run(config_from_dict(tiny(data, reference, optim={"lr": 1e5, "reference_batch": 8},
                                     train={"amp": amp, "max_steps": bad_step - 1}))) == 0
    assert same_weights(state["model"], last_checkpoint(reference)["model"])
    # Resumed with a limit, the run skips such steps, counts them and ends with finite weights.
    done = subprocess.run([*TRAIN, "--config", str(config), "train.nonfinite_limit=1000"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = int(re.search(r"(\d+) step\(s\) that were not finite were skipped", done.stdout).group(1))
    final = last_checkpoint(out)
    assert final["step"] == 16 and all_finite(final["model"]) and skipped >= 2
    assert read_metrics(out / "metrics.jsonl", "train")[-1]["nonfinite_steps"] == skipped


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_leaves_weights_momentum_and_statistics_untouched(fused):
    """The guard on a fused optimizer decides from a device-side flag (as on a GPU), on a plain one
    on the host; either way a NaN step changes nothing and is counted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = NonFiniteGuard(torch.device("cpu"))
    batches = [torch.randn(8, 3), torch.randn(8, 3), torch.full((8, 3), float("nan")), torch.randn(8, 3)]
    for step, x in enumerate(batches):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in opt.state]
        guard.begin(model)
        loss = model(x).square().mean()
        loss.backward()
        guard.step(opt, scaler, loss, step)
        opt.zero_grad()
        changed = not same_weights(before, model.state_dict())
        assert changed == (step != 2), step
        if step == 2:
            assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(momentum, model.parameters()))
    assert guard.count() == 1 and guard.first()[0] == 3 and guard.first()[1] != guard.first()[1]  # step 3, NaN


# ----------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_run_resumes_exactly(data, tmp_path):
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, train={"max_steps": 12}), tmp_path / "run.yaml")
    proc = subprocess.Popen([*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: train_lines(out) >= 3, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    lines = error_lines(stderr)
    assert lines[0] == ("trainers.train: interrupted (SIGINT): saving a checkpoint after the current step; "
                        "interrupt again to stop at once without it")
    stopped = last_checkpoint(out)["step"]
    assert lines[1].startswith(f"trainers.train: interrupted (SIGINT) at step {stopped}: checkpoint saved") \
        and len(lines) == 2 and 3 <= stopped < 12
    assert not (out / PREEMPTED).exists()  # not a pre-emption: nothing to requeue
    assert read_metrics(out / "metrics.jsonl", "event")[-1]["event"] == "interrupted"
    done = subprocess.run([*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tmp_path / "reference"
    assert run(config_from_dict(tiny(data, reference, train={"max_steps": 12}))) == 0
    assert same_weights(last_checkpoint(out)["model"], last_checkpoint(reference)["model"])


SIGNALS_SCRIPT = textwrap.dedent('''
    import os, signal, time
    from trainers.signals import StopSignal

    stop = StopSignal()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C again, as torchrun forwards it to its workers
    time.sleep(0.05)
    print("saving", stop.interrupted, stop.flags(), flush=True)
    time.sleep(1.2)  # a checkpoint that takes long
    os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C
    time.sleep(0.2)
    print("still running", flush=True)
''')


def test_a_second_ctrl_c_stops_at_once_but_the_same_one_seen_twice_does_not(tmp_path):
    script = tmp_path / "signals.py"
    script.write_text(SIGNALS_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.splitlines() == ["saving True [0.0, 1.0]"]
    assert done.returncode == -signal.SIGINT  # killed by the signal itself: no handler, no cleanup
    assert done.stderr.count("interrupted (SIGINT)") == 1


def _on_a_terminal(command: list, ignore_hangup: bool) -> tuple:
    """``command`` in its own session whose controlling terminal is a new pty; (process, pty master)."""
    master, slave = pty.openpty()
    name = os.ttyname(slave)

    def child():
        os.setsid()
        fd = os.open(name, os.O_RDWR)  # the session's controlling terminal
        for target in (0, 1, 2):
            os.dup2(fd, target)
        if ignore_hangup:  # what nohup does
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.Popen(command, cwd=REPO, env=ENV, preexec_fn=child)
    os.close(slave)
    threading.Thread(target=lambda: _drain(master), daemon=True).start()
    return proc, master


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


@pytest.mark.parametrize("nohup", [False, True])
def test_closing_the_terminal_saves_a_checkpoint_unless_the_run_ignores_it(data, tmp_path, nohup):
    """An ssh session that drops hangs up the terminal: the kernel sends SIGHUP, and every later write
    to the terminal fails. The run saves and exits 129; under nohup it trains on."""
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, train={"epochs": 1000, "max_steps": 400}), tmp_path / "run.yaml")
    proc, master = _on_a_terminal([*TRAIN, "--config", str(config)], ignore_hangup=nohup)
    try:
        wait_for(lambda: train_lines(out) >= 3, proc)
        os.close(master)  # the terminal goes away
        if nohup:
            seen = train_lines(out)
            wait_for(lambda: train_lines(out) >= seen + 3, proc)  # still training
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == (0 if nohup else 129)
    event = read_metrics(out / "metrics.jsonl", "event")[-1]
    assert (event["event"], event["signal"]) == (("preempted", "SIGTERM") if nohup else ("interrupted", "SIGHUP"))
    assert last_checkpoint(out)["step"] == event["step"] >= 3


# ----------------------------------------------------------------------------------- one run per folder
def test_a_second_run_on_the_same_out_dir_is_refused_and_a_dead_holder_blocks_nobody(data, tmp_path):
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out, train={"epochs": 1000, "max_steps": 100000, "checkpoint_every": 2}),
                        tmp_path / "run.yaml")
    first = subprocess.Popen([*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: train_lines(out) >= 2 and (out / "checkpoints" / "last.pt").exists(), first)
        for command in ([*TRAIN, "--config", str(config)], [*CLI, "train", "--config", str(config)]):
            done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
            lines = error_lines(done.stderr)
            assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
            assert f"train.out_dir {out} is in use by another run (pid {first.pid} on host" in lines[0]
        starts = [r for r in read_metrics(out / "metrics.jsonl", "event") if r["event"] == "start"]
        assert len(starts) == 1  # the refused runs wrote nothing
        first.kill()  # kill -9: the lock goes with the process
        first.wait(timeout=60)
    finally:
        first.kill()
    done = subprocess.run([*TRAIN, "--config", str(config), "train.max_steps=1"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # resumed at or past step 1: done at once


def test_the_lock_is_exclusive_even_within_one_process(tmp_path):
    a, b = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    a.acquire()
    with pytest.raises(RunDirInUse, match=f"pid {os.getpid()}"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()


# ----------------------------------------------------------------------------------- full disk mid-run
def _file_size_limit(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_checkpoint_that_cannot_be_written_stops_with_one_line(data, tmp_path):
    """A file-size limit makes the first checkpoint (~36 kB) fail as a full disk would, after
    config.yaml and the metrics lines were written: one line, exit 2, no temporary file left."""
    out = tmp_path / "run"
    config = write_yaml(tiny(data, out), tmp_path / "run.yaml")
    done = subprocess.run([*TRAIN, "--config", str(config)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=_file_size_limit(20_000))
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert re.search(r"cannot write checkpoint .*checkpoints/(best|last)\.pt: File too large; training stopped "
                     r"after step 8", lines[0]), lines[0]
    assert not list((out / "checkpoints").glob(".*tmp*")) and not (out / "checkpoints" / "last.pt").exists()


def test_metrics_that_cannot_be_written_are_a_warning_not_a_crash(tmp_path, capsys):
    log = MetricsLogger(Path("/dev/full"), enabled=True)  # a real device where every write fails: disk full
    for step in range(3):
        log.log("train", step, 0.0, loss=1.0)
    log.close()
    err = capsys.readouterr().err
    assert err.count("cannot write /dev/full (No space left on device)") == 1
    assert "3 metrics line(s) could not be written" in err


# ----------------------------------------------------------------------------------- hostile inputs
def test_a_crafted_checkpoint_cannot_run_code(data, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    code = (f"import os, torch\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'format': 1, 'step': 0, 'model': E()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=ENV)
    config = write_yaml(tiny(data, tmp_path / "run"), tmp_path / "run.yaml")
    done = subprocess.run([*TRAIN, "--config", str(config), "--resume", str(evil)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "holds objects a dali-ba checkpoint does not" in lines[0] and "posix.system" in lines[0]
    assert not marker.exists()


def test_dali_running_out_of_memory_is_named_with_the_batch_not_blamed_on_a_file(data):
    loader = BatchAugmentLoader(data / "train", batch_size=8, num_views=2, image_size=100000, device="cpu",
                                num_threads=1)
    started = time.monotonic()
    with pytest.raises(LoaderOutOfMemory) as info:
        next(iter(loader))
    assert not isinstance(info.value, DecodeError)
    assert "8 images × 2 view(s) of 100000×100000 px" in str(info.value) and "bad_alloc" in str(info.value)
    assert time.monotonic() - started < 60  # no culprit search over the batch's files


# ----------------------------------------------------------------------------------- the last word wins
def test_the_last_override_wins_end_to_end(data, tmp_path):
    """The issue's example through `dali-ba train`, and overrides on both sides of an option through
    `python -m trainers.train` (refused as unrecognized arguments before)."""
    for name, command in (
        ("cli", [*CLI, "train", "--config", "{config}", "data.num_views=2", "data.num_views=3", "data.num_views=2"]),
        ("trainer", [*TRAIN, "--config", "{config}", "data.num_views=3", "--resume", "none", "data.num_views=2"]),
    ):
        out = tmp_path / name
        config = write_yaml(tiny(data, out, train={"max_steps": 1}), tmp_path / f"{name}.yaml")
        command = [c.replace("{config}", str(config)) for c in command]
        done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        saved = json.loads(json.dumps(ckpt.load(out / "checkpoints" / ckpt.LAST)["config"]))
        assert saved["data"]["num_views"] == 2, name
        assert config_from_dict({}, [f"data.train_root={data}"]).data.num_views == 4  # the default stays 4


def test_bench_train_takes_overrides_on_both_sides_of_its_options(data, tmp_path):
    config = write_yaml(tiny(data, tmp_path / "unused"), tmp_path / "bench.yaml")
    record = tmp_path / "bench.json"
    done = subprocess.run([*CLI, "bench", "train", "--config", str(config), "data.num_views=3", "--steps", "1",
                           "--rounds", "1", "--warmup", "0", "data.num_views=2", "--json", str(record)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(record.read_text())["config"]["data"]["num_views"] == 2


TORCHRUN_FAILURE = (
    "[rank 0] trainers.train: error: cannot resume from X\n"
    "E1202 08:43:13.400000 23972 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: {code}) "
    "local_rank: 0 (pid: 24013) of binary: python\n"
    "Traceback (most recent call last):\n  File \"run.py\", line 1142, in <module>\n    main()\n"
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n====\ntrainers.train FAILED\n"
    "Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : {code} (pid: 1)\n====\n"
)


@pytest.mark.parametrize("code, shown", [(2, False), (130, False), (-11, True), (1, True)])
def test_torchruns_own_report_is_dropped_only_after_a_user_error_or_an_interrupt(code, shown):
    """The launcher's filter on torchrun's stderr: the ranks' lines and a progress bar pass through
    at once; torchrun's report is held, dropped for exit status 2 or 130, shown for a crash."""
    import io

    from dali_ba.torchrun_output import ReportFilter

    read, write = os.pipe()
    sink = io.BytesIO()
    report = ReportFilter(os.fdopen(read, "rb"), sink)
    os.write(write, b"\rtrain:  50%|#####")  # a progress bar's redraw, no line end yet
    deadline = time.monotonic() + 10
    while b"train:  50%" not in sink.getvalue():
        assert time.monotonic() < deadline, "a partial line was held back"
        time.sleep(0.01)
    os.write(write, b"\rtrain: 100%\n")
    os.write(write, b"Traceback (most recent call last):\n  File \"x.py\"\nValueError: a bug in a rank\n")
    os.write(write, TORCHRUN_FAILURE.format(code=code).encode())
    os.close(write)
    assert report.finish(1) == (1 if shown else code)
    out = sink.getvalue().decode()
    assert "ValueError: a bug in a rank" in out and "[rank 0] trainers.train: error" in out
    assert ("ChildFailedError" in out and "failed (exitcode" in out) == shown
