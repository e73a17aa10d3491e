# Keybroker: `make run` starts a KBS for a laptop; `make test` runs lint, type check and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test system-deps lint typecheck unit integration e2e format clean protos bench bench-quick profile \
	background-check-kbs passport-issuer-kbs passport-resource-kbs cli image-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

# The benchmark's own extra (granian, for the servers section): the test extra holds it too,
# since tests/integration/test_bench_quick.py runs the whole suite small.
$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/kbs --insecure-dev

# The Debian packages the tests need (softhsm2, nginx-light, ...): installed when missing as
# root, otherwise the exact apt-get line is printed and make stops.
system-deps:
	scripts/system-deps

# Tests run in 3 pytest-xdist workers (most wait on real servers, so 3 beat 2 on 2 cores);
# worksteal keeps the long end-to-end tests from piling up on one worker. Each test owns its
# database, Redis namespace and ports (tests/ports.py), so workers never meet.
PYTEST_PARALLEL ?= -n 3 --dist worksteal

# --no-skips: a skipped test (missing vector or tool) fails the run.
test: system-deps $(VENV)/.installed-test lint typecheck
	$(BIN)/pytest --no-skips $(PYTEST_PARALLEL)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

unit integration e2e: $(VENV)/.installed-test
	$(BIN)/pytest $(PYTEST_PARALLEL) tests/$@

# The benchmark suite (docs/performance.md): real kbs processes on loopback, 15 to 20 minutes.
# Needs PostgreSQL and Redis on this machine and nginx for the replica rows.
bench: system-deps $(VENV)/.installed-bench
	cd bench && PYTHONPATH=. ../$(BIN)/python -m kbsbench

# The same suite in a minute, with a few hundred requests: checks that it runs, not how fast.
bench-quick: system-deps $(VENV)/.installed-bench
	cd bench && PYTHONPATH=. ../$(BIN)/python -m kbsbench --quick

# Where a GET and a handshake spend their CPU: py-spy flame graphs and a table per mode
# (bench/kbsbench/profile.py), about a minute. TAG names the files (before, after, ...).
TAG ?= $(shell date +%Y%m%d-%H%M%S)
profile: system-deps $(VENV)/.installed-test
	cd bench && PYTHONPATH=. ../$(BIN)/python -m kbsbench.profile --tag $(TAG)

format: $(VENV)/.installed-test
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .kbs .mypy_cache .pytest_cache .ruff_cache $(BUILD_DIR)

# Upstream's build interface (kbs/Makefile): `make background-check-kbs AS_TYPES=coco-as
# COCO_AS_INTEGRATION_TYPE=grpc ALIYUN=true`, passport-issuer-kbs, passport-resource-kbs, cli.
# Each installs keybroker with the extras the switches select into $(BUILD_DIR)/venvs/<extras>,
# writes a starter config to $(BUILD_DIR)/<target>/ and prints the command that runs it
# (scripts/build-kbs; the switch table is in the README). Only switches given on the command
# line or in the environment are passed on; the script names the accepted values of each.
BUILD_DIR ?= build
BUILD_SWITCHES := AS_TYPE AS_TYPES COCO_AS_INTEGRATION_TYPE ALIYUN VAULT AWS GCP \
	NEBULA_CA_PLUGIN EXTERNAL_PLUGIN PQC_EXPERIMENTAL PKCS11 POSTGRES REDIS ATTESTER CLI_FEATURES ARCH
BUILD_ARGS = $(foreach v,$(BUILD_SWITCHES),$(if $(filter-out undefined,$(origin $(v))),$(v)=$($(v)))) \
	--build-dir $(BUILD_DIR) $(if $(KBS_LISTEN),--listen $(KBS_LISTEN)) \
	$(if $(AS_LISTEN),--as-listen $(AS_LISTEN))

background-check-kbs passport-issuer-kbs passport-resource-kbs cli:
	$(PYTHON) scripts/build-kbs $@ $(BUILD_ARGS)

# Regenerate the checked-in gRPC modules from src/keybroker/grpc_api/*.proto
protos: $(VENV)/.installed-test
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src \
		--grpc_python_out=src src/keybroker/grpc_api/*.proto

# Build docker/Dockerfile, run `kbs --help` in it, and see a wrong build arg refused. Needs a
# Docker daemon and PyPI, so it is not part of `make test` (docs/deployment.md).
image-test:
	scripts/image-test
