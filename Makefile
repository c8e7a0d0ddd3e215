# sparsetrain: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sparsetrain-installed
WHEELS := $(HOME)/.cache/sparsetrain/wheels
HOROVOD_VERSION := 0.28.1
HOROVOD_STAMP := $(VENV)/.horovod-installed
PYTEST_ARGS ?=

.PHONY: demo test lint install horovod sysdeps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel "setuptools>=68"

# torch is pinned first so that nothing else pulls a different build.
# deepspeed's setup imports torch, hence --no-build-isolation.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "lightning==2.6.6" numpy pyyaml safetensors \
		pytest pytest-timeout ruff matplotlib "compressed-tensors==0.12.2" "jsonargparse[signatures]==4.53.0"
	$(PIP) install -q --no-build-isolation "deepspeed==0.19.8"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

# Horovod 0.28.1 needs C++17 to build against torch 2.13 (FIELD_NOTES §6).
# The wheel is cached outside the repository, so a fresh clone does not rebuild.
$(HOROVOD_STAMP): $(STAMP)
	@set -euo pipefail; \
	whl=$$(ls $(WHEELS)/horovod-$(HOROVOD_VERSION)-*.whl 2>/dev/null | head -n1 || true); \
	if [ -z "$$whl" ]; then \
		echo "building horovod $(HOROVOD_VERSION) (C++17, gloo, no MPI); cached in $(WHEELS)"; \
		tmp=$$(mktemp -d); mkdir -p $(WHEELS); \
		$(PIP) download -q --no-deps --no-binary :all: -d $$tmp horovod==$(HOROVOD_VERSION); \
		tar -xzf $$tmp/horovod-$(HOROVOD_VERSION).tar.gz -C $$tmp; \
		src=$$tmp/horovod-$(HOROVOD_VERSION); \
		sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' $$src/CMakeLists.txt $$src/horovod/torch/CMakeLists.txt; \
		$(PIP) install -q "cmake>=3.18,<4" packaging psutil cloudpickle; \
		HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
		HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_GPU_OPERATIONS= MAKEFLAGS=-j2 \
		CMAKE_POLICY_VERSION_MINIMUM=3.5 \
		$(PIP) wheel -q --no-build-isolation --no-deps -w $(WHEELS) $$src; \
		rm -rf $$tmp; \
		whl=$$(ls $(WHEELS)/horovod-$(HOROVOD_VERSION)-*.whl | head -n1); \
	fi; \
	$(PIP) install -q --no-deps "$$whl"; \
	$(PIP) install -q cloudpickle psutil pyyaml packaging
	touch $@

horovod: $(HOROVOD_STAMP)

# iproute2 (ip, tc) for the two-host test bed; its tests skip with a reason where it is missing
# and cannot be installed (not root, no apt-get).
sysdeps:
	@command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
		else echo "iproute2 missing: the two-host test bed tests will be skipped"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) $(HOROVOD_STAMP) sysdeps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The run's 2:4 MLP layers end as a sparse-24-bitmask export, checked to load back bit for bit.
demo: $(STAMP)
	$(VENV)/bin/sparsetrain train recipes/quickstart.yaml --out runs/quickstart
	$(VENV)/bin/sparsetrain export runs/quickstart/checkpoints/last.ckpt --out runs/quickstart/export \
		--overwrite --verify

clean:
	rm -rf $(VENV) runs build *.egg-info
