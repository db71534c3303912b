"""``make gpu-check`` without a GPU: the one-line exit 2, argument parsing, the step runner's budget,
timeouts and failures, and the record it writes (``--dry-run``: the real machinery, stand-in steps)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_steps
from benchmarks.gpu_check import Context, Step, StepFailed, run_steps

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@no_gpu
def test_without_a_gpu_it_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpu-check: no CUDA GPU is visible")


@no_gpu
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_is_that_command():
    result = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[0].startswith("gpu-check: no CUDA GPU is visible")


def test_a_missing_dependency_is_one_line_naming_it_and_the_bundle(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = gpu_check.find_spec
    monkeypatch.setattr(gpu_check, "find_spec", lambda name: None if name in ("omegaconf", "nvidia.dali")
                        else real(name))
    line = gpu_check.preflight()
    assert line.startswith("gpu-check: missing DALI (nvidia-dali-cuda120/130), omegaconf:")
    assert "dali-bundle.sh" in line and "\n" not in line


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.steps == list(gpu_steps.STEP_NAMES) and args.budget_s == 480 and args.kill_signal == "TERM"
    args = gpu_check.parse_args(["--steps", "tests,torchrun", "--budget-s", "100", "--kill-signal", "KILL"])
    assert args.steps == ["tests", "torchrun"] and args.budget_s == 100
    for bad in (["--steps", "tests,nope"], ["--budget-s", "0"], ["--kill-signal", "HUP"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(bad)
        assert exc.value.code == 2
    # the step budgets fit in the total, with room to read the GPU stack first
    assert sum(s.budget_s for s in gpu_steps.steps(gpu_steps.STEP_NAMES)) <= 480 - 15


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_steps_get_their_budget_fail_alone_and_are_skipped_when_time_is_short():
    clock, deadlines = _Clock(), []

    def takes(seconds, error=None):
        def run(ctx):
            deadlines.append(ctx.deadline)
            clock.now += seconds
            if error is not None:
                raise error
            return {"summary": f"took {seconds}"}
        return run

    steps = [Step("a", 100, takes(60)), Step("b", 100, takes(10, StepFailed("b broke", {"partial": 1}))),
             Step("c", 50, takes(5, RuntimeError("bug"))), Step("d", 300, takes(1)), Step("e", 40, takes(1), min_s=10)]
    records = run_steps(steps, 150, lambda deadline: Context(ROOT, ROOT, ROOT, sys.executable, deadline),
                        clock=clock, log=lambda line: None)
    assert [r["status"] for r in records] == ["passed", "failed", "failed", "skipped", "passed"]
    assert records[0]["result"] == {"summary": "took 60"} and records[0]["duration_s"] == 60
    assert records[1]["reason"] == "b broke" and records[1]["result"] == {"partial": 1}
    assert records[2]["reason"] == "RuntimeError: bug"
    assert records[3]["reason"] == "75 s left of the 150 s budget; the step needs 150 s"
    # each deadline: the step's start + min(its budget, what is left)
    assert deadlines == [1000 + 100, 1060 + 90, 1070 + 50, 1075 + 40]


def _context(tmp_path, seconds: float) -> Context:
    return Context(ROOT, tmp_path, tmp_path, sys.executable, time.monotonic() + seconds, log=lambda line: None)


def test_a_child_past_its_deadline_is_killed_with_its_own_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with pytest.raises(StepFailed, match=r"slow: timed out after 1 s"):
        _context(tmp_path, 1.0).run(["bash", "-c", script], "slow")
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]


def test_a_failing_child_is_named_with_its_last_line_and_log(tmp_path):
    with pytest.raises(StepFailed) as exc:
        _context(tmp_path, 30).run(["bash", "-c", "echo working; echo 'the real error' >&2; exit 3"], "broken")
    assert exc.value.message.startswith("broken: exit 3: the real error (log: ")
    assert (tmp_path / "broken.log").read_text() == "working\nthe real error\n"
    ok = _context(tmp_path, 30).run([sys.executable, "-c", "import benchmarks; print('from the tree')"], "tree")
    assert ok.stdout == "from the tree\n"  # the source tree is on PYTHONPATH without an install


def test_junit_summary_of_a_real_pytest_run(tmp_path):
    (tmp_path / "test_x.py").write_text("import pytest\ndef test_ok(): pass\ndef test_bad(): assert 0\n"
                                        "def test_skip(): pytest.skip('no GPU here')\n")
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py"),
                    f"--junitxml={xml}", "-o", "junit_family=xunit1"], capture_output=True, timeout=120)
    result = gpu_steps.junit_summary(xml)
    assert result["collected"] == 3 and result["passed"] == ["test_ok"] and result["failed"] == ["test_bad"]
    assert result["skipped"] == ["test_skip: no GPU here"] and result["summary"] == "1 passed, 1 failed, 1 skipped"


def test_dry_run_writes_the_record_and_prints_the_summary(tmp_path, capsys):
    out, work = tmp_path / "results", tmp_path / "work"
    (work).mkdir()
    (work / "loader.log").write_text("fine\nW: Thread affinity could not be set (DALI #1209)\nfine\n")
    args = ["--dry-run", "--out-dir", str(out), "--work-dir", str(work), "--steps", "data,loader,torchrun"]
    assert gpu_check.main(args) == 0
    [path] = list(out.iterdir())
    assert re.fullmatch(r"gpu-dry-run-\d{8}\.json", path.name)
    record = json.loads(path.read_text())
    assert record["kind"] == "gpu-check" and record["card"] == "dry-run" and record["ok"] is True
    assert re.fullmatch(r"[0-9a-f]{40}", record["git_commit"]) and "torch" in record["versions"]
    assert [s["name"] for s in record["steps"]] == ["data", "loader", "torchrun"]
    assert all(s["status"] == "passed" and "budget_s" in s and "duration_s" in s for s in record["steps"])
    assert record["steps"][1]["warnings"] == ["loader.log: W: Thread affinity could not be set (DALI #1209)"]
    assert record["settings"]["budget_s"] == 480 and record["settings"]["dry_run"] is True
    printed = capsys.readouterr().out
    assert printed.startswith("gpu-check on dry-run:") and printed.rstrip().endswith(f"wrote {path}")
    # a second run the same day does not overwrite the first
    assert gpu_check.main(args) == 0
    assert len(list(out.iterdir())) == 2


def test_a_failed_step_makes_the_exit_code_1(tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise StepFailed("tests: 2 failed", {"failed": ["test_a", "test_b"]})

    monkeypatch.setattr(gpu_steps, "dry_steps", lambda names: [Step("tests", 10, broken)])
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]) == 1
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["ok"] is False and record["steps"][0]["reason"] == "tests: 2 failed"
    assert "NOT all steps passed" in capsys.readouterr().out


def test_card_names_become_file_names(tmp_path):
    assert gpu_check.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    when = time.strptime("2026-12-01 10:11:12", "%Y-%m-%d %H:%M:%S")
    first = gpu_check.result_path(tmp_path, "NVIDIA H200", when)
    assert first.name == "gpu-nvidia-h200-20261201.json"
    first.write_text("{}")
    assert gpu_check.result_path(tmp_path, "NVIDIA H200", when).name == "gpu-nvidia-h200-20261201-101112.json"


def test_the_child_commands_parse_with_the_real_parsers(tmp_path):
    """Every command the GPU steps run is accepted by its program's own parser and config."""
    from benchmarks import cli as bench_cli
    from benchmarks import gpu_probe
    from trainers.config import load_config
    from trainers.train import build_parser as trainer_parser

    ctx = _context(tmp_path, 10)

    def after_module(argv, module):
        return argv[argv.index(module) + 1:]

    parser = __import__("argparse").ArgumentParser()
    bench_cli.add_arguments(parser)
    for name in gpu_steps.LOADER_RUNS:
        args = parser.parse_args(after_module(gpu_steps.loader_argv(ctx, name), "benchmarks.cli"))
        assert args.device == "cuda" and args.json.endswith(f"{name}.json")
    for views in (1, 4):
        args = parser.parse_args(after_module(gpu_steps.train_argv(ctx, views), "benchmarks.cli"))
        cfg = load_config(ROOT / args.config, args.overrides)
        assert (cfg.data.num_views, cfg.train.amp, cfg.train.channels_last, cfg.model.arch) == (
            views, "bf16", True, "resnet50")
        assert (cfg.data.batch_size, cfg.data.global_batch_size) == (32, 0)
    for hints in ("off", "on"):
        argv = after_module(gpu_steps.probe_argv(ctx, hints), "benchmarks.gpu_probe")
        assert argv[0] == "memory" and argv[argv.index("--hints") + 1] == hints
        with pytest.raises(SystemExit):  # the probe's parser accepts them and then needs a GPU: stop at --help
            gpu_probe.main([*argv, "--help"])
    args = trainer_parser().parse_args(after_module(gpu_steps.torchrun_argv(ctx, tmp_path / "run"), "trainers.train"))
    cfg = load_config(ROOT / args.config, args.overrides)
    assert (cfg.train.max_steps, cfg.train.checkpoint_every, cfg.train.resume) == (150, 50, "auto")
    assert (cfg.data.batch_size, cfg.data.global_batch_size) == (32, 0)


@pytest.mark.slow
def test_the_torchrun_step_stops_and_resumes_a_real_run_on_the_cpu(tmp_path, monkeypatch):
    """The torchrun step's own logic (watch, signal torchrun, check the checkpoint, resume, check
    the continuation) on a tiny CPU run: gloo instead of NCCL, smallnet instead of ResNet-50, and
    1,000 steps (a few ms each) so that the signal lands well before the end."""
    from conftest import tiny, write_trainer_data, write_yaml

    monkeypatch.setattr(gpu_steps, "TRAIN_STEPS", 1000)

    data = write_trainer_data(tmp_path / "data")
    recipe = write_yaml(tiny(data, tmp_path / "unused"), tmp_path / "tiny.yaml")
    ctx = _context(tmp_path, 240)
    ctx.data = data
    ctx.options.update(recipe=str(recipe), kill_signal="TERM",
                       train_overrides=["data.num_threads=1", "data.batch_size=8", "train.eval_every=500",
                                        "train.epochs=130"])
    result = gpu_steps._torchrun(ctx)
    assert result["signalled_after_step"] >= gpu_steps.KILL_AFTER
    assert result["resumed_at"] == result["checkpoint_step"] >= gpu_steps.KILL_AFTER
    assert result["end_step"] == gpu_steps.TRAIN_STEPS and result["preempted"].startswith("SIGTERM at step")


def test_the_data_and_tests_steps_run_here(tmp_path):
    """``data`` writes JPEGs (and reuses them the next time); ``tests`` collects the GPU tests,
    which skip here: enough of them, none failing."""
    ctx = _context(tmp_path, 120)
    ctx.data = tmp_path / "data"
    ctx.options["images"] = 100
    made = gpu_steps._data(ctx)
    assert made["images"] == 100 and len(list((ctx.data / "val").rglob("*.jpg"))) == made["val_images"] == 20
    assert gpu_steps._data(ctx)["reused"] is True
    if torch.cuda.is_available():
        return  # the GPU tests themselves run in `make gpu-check`, not nested in this one
    result = gpu_steps._tests(ctx)
    assert result["collected"] >= gpu_steps.MIN_GPU_TESTS and not result["failed"] and not result["passed"]
    assert all("needs a CUDA GPU" in s for s in result["skipped"])
