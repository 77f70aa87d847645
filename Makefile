# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv when it is missing and re-install only when requirements*.txt
# or setup.py changed (make compares their times with the stamp files).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= demo_workdir
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
# The slowest tests are listed at the end of every run, to keep the inner loop fast.
PYTEST_DURATIONS ?= --durations=15

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip

$(VENV)/.installed: requirements.txt setup.py | $(BIN)/python
	@echo ">> installing the pinned stack into $(VENV) (first time: several minutes)"
	$(BIN)/pip install --quiet --quiet -r requirements.txt
	$(BIN)/pip install --quiet --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(BIN)/pip install --quiet --quiet -r requirements-test.txt
	@# The search page's browser test drives Debian's chromium; a CJK font renders Chinese
	@# queries (page screenshots, plot-embeddings labels).
	command -v chromium >/dev/null && fc-list :lang=zh | grep -q . || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei)
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/clicklens demo --config $(CONFIG) --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_DURATIONS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache *.egg-info
