# The two commands a user needs:
#   make run    set up this machine and run the registry on 127.0.0.1:$(PORT)
#   make test   set up this machine and run the test suite
# and, before the tests in CI (.ci/run):
#   make lint   ruff, mypy and the import rules (lint-imports; contracts in pyproject.toml)
SHELL := /bin/bash
PORT ?= 8080
STORAGE_PATH ?= $(CURDIR)/var/storage
VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: run test lint setup system-deps venv debian-set self-image serve-self-image bench bench-layering clean

run: setup
	-@$(MAKE) --no-print-directory debian-set || echo "nixery: the Debian-derived set could not be made; serving the busybox set"
	PORT=$(PORT) STORAGE_PATH=$(STORAGE_PATH) $(VENV)/bin/nixery serve

test: setup
	-@$(MAKE) --no-print-directory debian-set || echo "nixery: the Debian-derived set could not be made; its tests will be skipped"
	$(VENV)/bin/pytest -ra $(PYTEST_ARGS)

# All three run, so one CI log shows every finding; the target fails if any did.
lint: setup
	@status=0; \
	$(VENV)/bin/ruff check nixery tests bench || status=1; \
	$(VENV)/bin/mypy || status=1; \
	$(VENV)/bin/lint-imports --no-cache || status=1; \
	exit $$status

setup: system-deps venv

system-deps:
	bash scripts/install-system-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

debian-set:
	bash scripts/debian-set/setup.sh

# The registry's own image, built by the registry from the Debian set (docs/self-image.md).
self-image: setup debian-set
	bash scripts/self-image/generate.sh --build

serve-self-image: self-image
	NIXERY_PKGS_PATH=.cache/self-set PORT=$(PORT) STORAGE_PATH=$(STORAGE_PATH) $(VENV)/bin/nixery serve

bench-layering: venv
	$(PYTHON) bench/layering.py

# Every benchmark (about 30 minutes; BENCH_ARGS=--quick for a short run): tables in docs/benchmarks/.
bench: setup
	$(PYTHON) bench/layering.py
	$(PYTHON) bench/serving.py $(BENCH_ARGS)
	$(PYTHON) bench/cold_build.py $(BENCH_ARGS)
	$(PYTHON) bench/scale.py $(BENCH_ARGS)
	$(PYTHON) bench/load.py $(BENCH_ARGS)
	$(PYTHON) bench/stored_work.py $(BENCH_ARGS)
	$(PYTHON) bench/history_gc.py

clean:
	rm -rf $(VENV) var .cache
