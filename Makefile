# The two commands of the README: `make demo` and `make test`. Each creates .venv when
# missing and installs the project with the pinned versions of constraints.txt.
# `make gpu-check` installs nothing: it runs from this source tree (docs/gpu.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DATA ?= data/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-fast lint clean gpu-check

# torch + torchvision + DALI take 6.6 GB in the venv; check first, so a full disk fails
# with a message instead of pip's OSError half-way through the install (skipped once torch is in).
INSTALL_NEEDS_GB ?= 7

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@ls -d $(VENV)/lib/python*/site-packages/torch >/dev/null 2>&1 || $(PY) -c \
	  "import shutil,sys; free=shutil.disk_usage('$(VENV)').free/2**30; sys.exit(0 if free >= $(INSTALL_NEEDS_GB) else \
	  f'make: installing torch, torchvision and DALI into $(VENV) needs ~$(INSTALL_NEEDS_GB) GB free on its disk, {free:.1f} GB is free')"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[train,plot,s3,test]'
	@touch $@

install: $(STAMP)

# Real images: Fashion-MNIST from the Debian package (falls back to generated JPEGs when
# apt is not available), the M=4 view grid, then a short CPU training run.
demo: $(STAMP)
	$(VENV)/bin/dali-ba data fashion-mnist $(DEMO_DATA) || \
	  { echo "falling back to generated JPEGs"; $(VENV)/bin/dali-ba data synth $(DEMO_DATA) --images 2000 --classes 10 --val-images 500; }
	$(VENV)/bin/dali-ba show --root $(DEMO_DATA)/train --views 4 --images 8 --augment cifar --image-size 28 --out $(DEMO_OUT)/views.png
	$(VENV)/bin/dali-ba train --config pipelines/demo-cpu.yaml train.out_dir=$(DEMO_OUT) train.resume=none

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

# The GPU path in one run of at most 8 minutes on one GPU (docs/gpu.md): no install, no network;
# the venv's Python when there is one, else python3 (e.g. a GPU machine's own, DALI carried there).
# Exit 2 with one line where there is no GPU. GPU_CHECK_ARGS: e.g. --steps tests,loader.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs data .pytest_cache
