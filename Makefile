# The two set-up commands: `make demo` (the main job end to end on the built-in toy model) and
# `make test` (the whole suite). Both create the virtual environment when it is missing.
# `make example` runs scripts/example.sh, every command scripted from a shell on the tiny model.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: demo example test lint venv clean

venv: $(BIN)/cdtool

$(BIN)/cdtool: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/cdtool demo -o $(DEMO_OUT) --force

example: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/example.sh example-out

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check cdtool tests benchmarks scripts tools research
	$(BIN)/ruff format --check cdtool tests benchmarks scripts tools research

clean:
	rm -rf $(DEMO_OUT) example-out .pytest_cache
