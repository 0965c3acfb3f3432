# Two entry points for a fresh machine:
#   make run   sets everything up and trains the default NoisyViT on Fashion-MNIST
#   make test  sets everything up and runs the test suite (CPU, 8 fake devices)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/default
CONFIG ?= configs/default.py
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
# System packages come from apt, through sudo when not root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: run test install data tcmalloc shellcheck clean

$(VENV)/.installed: setup.cfg pyproject.toml .ci/constraints.txt
	@# Debian and Ubuntu ship venv's pip bootstrap separately.
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST ships as a Debian package; nothing is downloaded from a dataset hub.
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# TCMalloc keeps each step's memory instead of handing it back to the kernel
# (noisy_flax/cpu_tuning.py); without it the run still works, on glibc's malloc.
tcmalloc:
	@if ! /sbin/ldconfig -p | grep libtcmalloc >/dev/null; then \
	  $(SUDO) apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libtcmalloc-minimal4; } || \
	  echo "note: could not install libtcmalloc-minimal4; running on glibc's malloc (slower on the CPU)"; \
	fi

# The launch scripts' tests lint them with ShellCheck, and fail without it.
shellcheck:
	@command -v shellcheck >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq shellcheck; }

run: install data tcmalloc
	$(PY) -m noisy_flax.main --config $(CONFIG) --workdir $(WORKDIR)

# TCMalloc too: a test checks that the CPU entry points preload it.
# Two pytest processes (pytest-xdist), each test file kept in one of them so
# its module fixtures are built once: 11-14 instead of 17-18 minutes on 2
# cores, as compiles and subprocess start-ups are mostly single-threaded.
# Each process peaks near 3.5 GB. TEST_WORKERS=auto starts one per core;
# TEST_WORKERS=0 runs the tests in pytest's own process.
TEST_WORKERS ?= 2
test: install tcmalloc shellcheck
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) workdirs .pytest_cache
