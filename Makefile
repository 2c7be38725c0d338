# The repository root (where this Makefile is), so `make -f` from elsewhere cleans here.
ROOT := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MTMIM_SHARED ?= $(abspath ../shared)

.PHONY: install test test-fast lint demo demo-fgnet clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)
	@echo "mtmim is installed in $(VENV)/bin: run 'source $(VENV)/bin/activate' to put it on PATH," \
	      "or call it as $(VENV)/bin/mtmim"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not real"

lint: $(STAMP)
	$(VENV)/bin/ruff check mtmim_cli tests bench scripts

# The whole chain on the embedded synthetic faces (no dataset needed), then on real FG-NET.
demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_out/synthetic

demo-fgnet: $(STAMP)
	$(PY) scripts/demo.py --fgnet $(MTMIM_SHARED) --out demo_out/fgnet

# Also the demo's, evaluate's and the benches' outputs in the repository root (the README's
# figure runs among them: hours of CPU); the aligned caches (*.h5) stay.
clean:
	cd $(ROOT) && rm -rf $(VENV) build *.egg-info .pytest_cache demo_out eval runs
