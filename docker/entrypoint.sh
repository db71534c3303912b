#!/usr/bin/env bash
# Entry point of the dali-ba images (docker/Dockerfile and docker/Dockerfile.cpu).
#
#   docker run IMAGE                          -> dali-ba --help
#   docker run IMAGE train --config X k=v     -> dali-ba train --config X k=v
#   docker run IMAGE data verify /data/x      -> dali-ba data verify /data/x
#   docker run IMAGE torchrun --nproc-per-node=8 -m trainers.train ...
#   docker run IMAGE bash | python ... | make ...   -> runs that program as is
#
# A first argument that is a program on PATH runs as is; anything else goes to `dali-ba`.
# In NVIDIA's PyTorch containers NVIDIA's own entry point runs first (its banner, driver and
# shared-memory checks), then hands back to this script. Every step uses `exec`, so the
# program that ends up running (torchrun, dali-ba) is the process that receives SIGTERM from
# `docker stop` or Kubernetes, and torchrun passes it on to the trainer, which checkpoints.
set -euo pipefail

nv_entrypoint=/opt/nvidia/nvidia_entrypoint.sh
if [[ -x "$nv_entrypoint" && -z "${DALI_BA_IN_NV_ENTRYPOINT:-}" ]]; then
    export DALI_BA_IN_NV_ENTRYPOINT=1
    exec "$nv_entrypoint" "$0" "$@"
fi

if [[ $# -eq 0 ]]; then
    exec dali-ba --help
fi

case "$1" in
    -*) exec dali-ba "$@" ;;
esac

if command -v -- "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec dali-ba "$@"
