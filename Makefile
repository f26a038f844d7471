# The two commands: `make reproduce` and `make test`. Both set everything up themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tcl-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
CONFIG ?=
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup data test reproduce reproduce-full clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (installed here when running as root).
data: setup
	@$(PY) -W ignore -m tcl.data --check 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	  fi; $(PY) -W ignore -m tcl.data --check; }

# pytest over tests/ plus nbval over every notebook (default = embedded CPU parameters).
# Figures and run outputs of test runs go to runs/test-figures and runs/test, so the committed figures/ and the
# runs/<notebook>/ outputs of `make reproduce` stay as they are.
test: data
	TCL_FIGURES=$(CURDIR)/runs/test-figures TCL_RUNS=$(CURDIR)/runs/test $(PY) -m pytest tests $(NOTEBOOKS) --nbval-lax -q --durations=15

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
