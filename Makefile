# The two commands of the README. Both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup setup-runtime clean

$(BIN)/.runtime-stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[runtime]'
	touch $@

$(BIN)/.test-stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/.runtime-stamp $@

setup-runtime: $(BIN)/.runtime-stamp
setup: $(BIN)/.test-stamp

demo: $(BIN)/.runtime-stamp
	$(BIN)/edge-inspect demo --line

test: $(BIN)/.test-stamp
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
