# The two set-up commands of the README: `make demo` and `make test` (each creates the environment first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
# device-check: auto (CUDA when present), cuda or cpu; DEVICE_CHECK_ARGS e.g. --budget-s 3600 or --no-pipeline
DEVICE ?= auto
DEVICE_CHECK_ARGS ?=
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test lint env clean device-check

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

## Measure the GPU path in minutes (correctness against the CPU, training and inference speed, a pipeline run):
## prints every figure and writes results/device_check.json; on a SLURM GPU node:
## srun --gres=gpu:1 --time=00:15:00 make device-check
device-check: env
	$(BIN)/python benchmarks/device_check.py --device $(DEVICE) $(DEVICE_CHECK_ARGS)

clean:
	rm -rf results .snakemake
