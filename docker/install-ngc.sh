#!/usr/bin/env bash
# Install dali-ba into an NVIDIA PyTorch (NGC) container WITHOUT replacing the container's torch.
#
#   docker/install-ngc.sh deps      # dali-ba's non-torch dependencies, and DALI (see DALI below)
#   docker/install-ngc.sh package   # dali-ba itself (pip install --no-deps .), then a smoke check
#
# Run from the repository root (docker/Dockerfile does). Works the same outside Docker, inside a
# running NGC container or an Enroot/Apptainer image of one.
#
# Why not just `pip install .`: pyproject.toml asks for torch>=2.1 and nvidia-dali-cuda120. In an
# NGC container torch is NVIDIA's own build (e.g. 2.10.0a0+...), DALI may already be installed for
# the container's CUDA, and in CUDA 13 containers the CUDA-12 DALI wheel would be a second copy of
# the `nvidia.dali` module. So: the package goes in with --no-deps, its other dependencies go in
# under a constraint that freezes the container's torch/torchvision/numpy/pillow (plus NVIDIA's own
# /etc/pip/constraint.txt, present since the 25.03 containers), and DALI is handled on its own.
#
# DALI (environment variable, Dockerfile build arg of the same name):
#   container (default)  keep the container's DALI when it is new enough (the minimum is read from
#                        pyproject.toml); otherwise install nvidia-dali-cuda120 or -cuda130, matching
#                        the CUDA major version torch was built with.
#   <pip requirement>    e.g. "nvidia-dali-cuda130==2.4.0": remove every installed nvidia-dali-*
#                        package and install exactly this one (NVIDIA's constraint file is bypassed
#                        for this one install only).
set -euo pipefail

mode=${1:?usage: install-ngc.sh deps|package}
PY=${PYTHON:-python}
DALI=${DALI:-container}
pip_install=("$PY" -m pip install --no-cache-dir --disable-pip-version-check)

keep=$(mktemp /tmp/dali-ba-keep.XXXXXX)
trap 'rm -f "$keep"' EXIT
"$PY" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|torchvision|numpy|pillow)==' >"$keep" || true
constraints=(-c "$keep")
if [[ -f /etc/pip/constraint.txt ]]; then
    constraints+=(-c /etc/pip/constraint.txt)
fi

torch_line_before=$(grep -i '^torch==' "$keep" || true)

# pyproject.toml's dependencies, split into "DALI minimum" and "everything that is not torch".
read_pyproject() {
    "$PY" - "$1" <<'PYEOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python < 3.11: pip vendors a TOML reader
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
name = lambda d: re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower()
if sys.argv[1] == "deps":
    print("\n".join(d for d in deps
                    if name(d) not in ("torch", "torchvision") and not name(d).startswith("nvidia-dali")))
else:
    dali = [d for d in deps if name(d).startswith("nvidia-dali")]
    m = re.search(r">=\s*([0-9][0-9.]*)", dali[0]) if dali else None
    print(m.group(1) if m else "0")
PYEOF
}

install_dali() {
    local min installed cuda pkg
    min=$(read_pyproject dali-min)
    if [[ "$DALI" != container ]]; then
        mapfile -t old < <("$PY" -m pip list --format=freeze 2>/dev/null | grep -ioE '^nvidia-dali-cuda[0-9]+' || true)
        if [[ ${#old[@]} -gt 0 ]]; then
            "$PY" -m pip uninstall -y "${old[@]}"
        fi
        PIP_CONSTRAINT=/dev/null "${pip_install[@]}" -c "$keep" "$DALI"
        return
    fi
    # Prints the container's DALI version; exit 0 when it is >= the minimum, 1 older, 2 missing.
    if installed=$("$PY" - "$min" <<'PYEOF'
import sys
try:
    import nvidia.dali as dali
except ImportError:
    sys.exit(2)
print(dali.__version__)
version = lambda v: tuple(int(x) for x in v.split(".")[:2])
sys.exit(0 if version(dali.__version__) >= version(sys.argv[1]) else 1)
PYEOF
    ); then
        echo "install-ngc: keeping the container's DALI $installed (>= $min)"
        return
    fi
    cuda=$("$PY" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')
    pkg="nvidia-dali-cuda${cuda}0"
    echo "install-ngc: no DALI >= $min in this container; installing $pkg>=$min (torch built for CUDA $cuda)"
    PIP_CONSTRAINT=/dev/null "${pip_install[@]}" -c "$keep" "$pkg>=$min"
}

case "$mode" in
    deps)
        mapfile -t deps < <(read_pyproject deps)
        echo "install-ngc: dependencies ${deps[*]} (container keeps: $(tr '\n' ' ' <"$keep"))"
        "${pip_install[@]}" "${constraints[@]}" "${deps[@]}"
        install_dali
        ;;
    package)
        # Built in pip's isolated build environment with pyproject.toml's own build requirements,
        # NVIDIA's constraint file switched off for this step only: the container's setuptools may
        # be too old for pyproject.toml (an SPDX `license = "..."` string needs setuptools >= 77).
        # --no-deps: nothing but dali-ba itself is installed here.
        PIP_CONSTRAINT=/dev/null "${pip_install[@]}" --no-deps .
        dali-ba --version
        "$PY" -c 'import torch, nvidia.dali, dali_ba, trainers; print("torch", torch.__version__, "| DALI", nvidia.dali.__version__, "| dali-ba", dali_ba.__version__)'
        ;;
    *)
        echo "usage: install-ngc.sh deps|package" >&2
        exit 2
        ;;
esac

torch_line_after=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -i '^torch==' || true)
if [[ "$torch_line_before" != "$torch_line_after" ]]; then
    echo "install-ngc: torch changed from '$torch_line_before' to '$torch_line_after': refusing" >&2
    exit 1
fi
