#!/usr/bin/env bash
# Install dali-ba into an NVIDIA PyTorch (NGC) container WITHOUT replacing the container's torch.
#
#   docker/install-ngc.sh deps              # dali-ba's non-torch dependencies and extras, and DALI
#   docker/install-ngc.sh package           # dali-ba itself (pip install --no-deps .), then a smoke check
#   docker/install-ngc.sh dali-requirement  # print the DALI wheel `deps` installs when the container
#                                           # has none new enough (for $PYTHON's torch); installs nothing
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
# EXTRAS (environment variable): pyproject.toml's optional-dependency groups installed with the
# dependencies, default "train plot s3" (the trainer, plots, s3:// datasets); their torch and
# torchvision entries are left out: the container's own builds stay.
#
# DALI (environment variable, Dockerfile build arg of the same name):
#   container (default)  keep the container's DALI when it is new enough (the minimum is read from
#                        pyproject.toml); otherwise install nvidia-dali-cuda120 or -cuda130, matching
#                        the CUDA major version torch was built with.
#   <pip requirement>    e.g. "nvidia-dali-cuda130==2.4.0": remove every installed nvidia-dali-*
#                        package and install exactly this one (NVIDIA's constraint file is bypassed
#                        for this one install only).
set -euo pipefail

usage="usage: install-ngc.sh deps|package|dali-requirement"
mode=${1:?$usage}
PY=${PYTHON:-python}
DALI=${DALI:-container}
EXTRAS=${EXTRAS:-train plot s3}
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

# pyproject.toml's dependencies: "deps" (everything that is not torch, torchvision or DALI, plus
# the optional groups named after it), or "dali-min" (DALI's minimum version).
read_pyproject() {
    "$PY" - "$@" <<'PYEOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python < 3.11: pip vendors a TOML reader
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
deps = project["dependencies"]
name = lambda d: re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower()
if sys.argv[1] == "deps":
    extras = project.get("optional-dependencies", {})
    unknown = [e for e in sys.argv[2:] if e not in extras]
    if unknown:
        sys.exit(f"install-ngc: EXTRAS: no optional-dependency group {', '.join(unknown)} in pyproject.toml")
    wanted = deps + [d for e in sys.argv[2:] for d in extras[e]]
    keep = [d for d in wanted if name(d) not in ("torch", "torchvision") and not name(d).startswith("nvidia-dali")]
    print("\n".join(dict.fromkeys(keep)))
else:
    dali = [d for d in deps if name(d).startswith("nvidia-dali")]
    m = re.search(r">=\s*([0-9][0-9.]*)", dali[0]) if dali else None
    print(m.group(1) if m else "0")
PYEOF
}

# The DALI wheel for this Python's torch: nvidia-dali-cuda120 or -cuda130 by the CUDA major version
# torch was built with (a CPU-only torch counts as CUDA 12), at least pyproject.toml's minimum.
# An explicit DALI=<requirement> is that requirement.
dali_requirement() {
    local min cuda
    if [[ "$DALI" != container ]]; then
        echo "$DALI"
        return
    fi
    min=$(read_pyproject dali-min)
    cuda=$("$PY" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')
    echo "nvidia-dali-cuda${cuda}0>=$min"
}

install_dali() {
    local min installed pkg
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
    pkg=$(dali_requirement)
    echo "install-ngc: no DALI >= $min in this container; installing $pkg (matching torch's CUDA major)"
    PIP_CONSTRAINT=/dev/null "${pip_install[@]}" -c "$keep" "$pkg"
}

case "$mode" in
    dali-requirement)
        dali_requirement
        exit 0
        ;;
    deps)
        read -r -a extras <<<"$EXTRAS"
        deps_text=$(read_pyproject deps "${extras[@]}")
        mapfile -t deps <<<"$deps_text"
        echo "install-ngc: dependencies and extras (${extras[*]}): ${deps[*]} (container keeps: $(tr '\n' ' ' <"$keep"))"
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
        echo "$usage" >&2
        exit 2
        ;;
esac

torch_line_after=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -i '^torch==' || true)
if [[ "$torch_line_before" != "$torch_line_after" ]]; then
    echo "install-ngc: torch changed from '$torch_line_before' to '$torch_line_after': refusing" >&2
    exit 1
fi
