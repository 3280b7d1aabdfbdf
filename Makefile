# One entry point for users and CI. Every target is idempotent and works on a machine with no GPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup drill test lint format dashboard notebooks clean

setup: $(STAMP)

# Re-install only when the dependency list changes: a second `make setup` takes seconds.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

drill: setup
	$(BIN)/lab drill

test: setup
	$(BIN)/ruff check lab tests dashboard benchmarks notebooks
	$(BIN)/ruff format --check lab tests dashboard benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check lab tests dashboard benchmarks notebooks

format: setup
	$(BIN)/ruff format lab tests dashboard benchmarks
	$(BIN)/ruff check --fix lab tests dashboard benchmarks notebooks

dashboard: setup
	$(BIN)/lab dashboard

notebooks: setup
	$(BIN)/lab notebooks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
