# The two set-up commands of the README: `make demo` and `make test` (each creates the environment first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test lint env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## Run the whole pipeline on the built-in synthetic demo cohort (results/demo/).
demo: env
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	$(BIN)/snakemake --cores 1 --configfile config/config.yaml --report results/demo/report.html

## Run lint (ruff, snakefmt, snakemake --lint) and the test suite: unit tests, end-to-end runs on phantoms (the
## labelled demo and the config matrix of tests/test_config_matrix.py and tests/test_population.py), and the real
## cohorts when ../shared/data exists.
test: env lint
	$(BIN)/pytest -q

lint: env
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakefmt --check rules Snakefile
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean:
	rm -rf results .snakemake
