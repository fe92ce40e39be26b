PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/funmatch demo --workdir=demo_out

# Two workers (pytest-xdist; tests sharing a module fixture stay together):
# CI has 2 cores, and many tests wait on subprocesses or trace graphs on one.
# The 20 slowest tests are listed, to keep an eye on CI's 30 minutes. ruff first: the
# line length the code is written to, and sorted imports.
test: $(STAMP)
	$(VENV)/bin/ruff check funmatch_keras tests benchmarks examples
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=20

clean:
	rm -rf $(VENV) demo_out
