# lksmfs: `make run` and `make test` are the two commands a fresh Debian machine needs.
# Both install what is missing first (Debian fuse3 + libfuse2 and prometheus-node-exporter as root,
# a venv in .venv, the package with its test and plot extras).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test unit live lint bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@if ! command -v fusermount3 >/dev/null 2>&1 && ! command -v fusermount >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 \
	      && (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfuse2 \
	          || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfuse2t64); \
	  else echo "warning: fuse3/libfuse2 missing and not root: FUSE tests will be skipped" >&2; fi; \
	fi
	@if ! command -v prometheus-node-exporter >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus-node-exporter; \
	  else echo "warning: prometheus-node-exporter missing and not root: its tests will be skipped" >&2; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	@# the editable install runs the tree's sources: compile them now, so that a run that
	@# cannot write __pycache__ (another user, a read-only tree) does not recompile them
	@# every time (50-85 ms of each `lksmfs` command's start-up)
	$(PY) -m compileall -q lksmfs
	touch $(STAMP)

run: setup
	$(PY) scripts/demo.py

test: lint
	$(PY) -m pytest -q -rfEs -p no:cacheprovider tests

unit: setup
	$(PY) -m pytest -q -rfEs tests/unit

live: setup
	$(PY) -m pytest -q -rfEs tests/live

# mypy's settings (strict, the package's files) are in pyproject.toml
lint: setup
	$(VENV)/bin/ruff check lksmfs testkit tests bench scripts
	$(VENV)/bin/mypy

# benches run from the repository root, where `bench` and `testkit` are importable
bench: setup
	$(PY) -m bench.floor --sizes 1G,4G
	$(PY) -m bench.scan_throughput
	$(PY) -m bench.filter_effect
	$(PY) -m bench.engine_memory
	$(PY) -m bench.attr_latency
	$(PY) -m bench.idle_cost

clean:
	rm -rf $(VENV) build *.egg-info
