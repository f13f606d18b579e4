# The two set-up commands: `make demo` (the main job end to end on the built-in model) and
# `make test` (the whole suite). Both create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: demo test lint venv clean

venv: $(BIN)/cdtool

$(BIN)/cdtool: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh $(DEMO_OUT)

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check cdtool tests benchmarks
	$(BIN)/ruff format --check cdtool tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
