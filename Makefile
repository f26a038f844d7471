# The two commands: `make reproduce` and `make test`. Both set everything up themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tcl-installed
# The oldest timm tcl supports, read from pyproject.toml ("timm>=X"); `make test-floor` runs the unit tests on it.
TIMM_FLOOR := $(shell sed -n 's/^ *"timm>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR_VENV := .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.tcl-installed-timm-$(TIMM_FLOOR)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
CONFIG ?=
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup setup-floor data test test-floor gpu-check reproduce reproduce-full clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# A second venv with the declared timm floor pinned (only what the unit tests need; no notebooks there).
setup-floor: $(FLOOR_STAMP)

$(FLOOR_STAMP): pyproject.toml
	@test -n "$(TIMM_FLOOR)" || { echo "no \"timm>=X\" line in pyproject.toml"; exit 1; }
	@test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q -e ".[test]" "timm==$(TIMM_FLOOR)"
	@rm -f $(FLOOR_VENV)/.tcl-installed-timm-*
	@touch $(FLOOR_STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (installed here when running as root).
data: setup
	@$(PY) -W ignore -m tcl.reference.data --check 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	  fi; $(PY) -W ignore -m tcl.reference.data --check; }

# pytest over tests/ plus nbval over every notebook (default = embedded CPU parameters), on the newest timm pip
# resolves; then the unit tests once more on the declared timm floor (test-floor).
# Figures and run outputs of test runs go to runs/test-figures and runs/test, so the committed figures/ and the
# runs/<notebook>/ outputs of `make reproduce` stay as they are.
test: data
	TCL_FIGURES=$(CURDIR)/runs/test-figures TCL_RUNS=$(CURDIR)/runs/test $(PY) -m pytest tests $(NOTEBOOKS) --nbval-lax -q --durations=15
	@$(MAKE) --no-print-directory test-floor

# The unit tests (not the notebooks) on timm == the floor declared in pyproject.toml.
test-floor: data $(FLOOR_STAMP)
	@echo "== unit tests on timm $(TIMM_FLOOR) ($(FLOOR_VENV))"
	$(FLOOR_PY) -m pytest tests -q

# On a machine with CUDA: exactness of patched forwards, bf16 throughput at batch 256, a 1,000-candidate search
# (random-weight deit_small_patch16_224); prints a JSON summary. Exits with a message where there is no GPU.
gpu-check: setup
	$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# Execute every notebook with papermill into runs/ (CONFIG=full uses configs/<notebook>.full.yaml where present).
reproduce: data
	@mkdir -p runs/notebooks figures
	@set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .ipynb); cfg=configs/$$name.$(CONFIG).yaml; \
	  args=""; if [ -n "$(CONFIG)" ] && [ -f $$cfg ]; then args="-f $$cfg"; fi; \
	  echo "== $$name $$args"; \
	  $(PY) -m papermill $$nb runs/notebooks/$$name.ipynb --cwd notebooks -k python3 $$args --progress-bar; \
	done
	@echo "notebooks executed into runs/notebooks/, figures in figures/"

reproduce-full:
	$(MAKE) reproduce CONFIG=full

clean:
	rm -rf runs/notebooks runs/test-figures runs/test
