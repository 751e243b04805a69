# Two commands for users: `make train` and `make test`. Both install what they need.
SHELL := /bin/bash
# The first Python 3.11 on PATH that is 3.11.4 or later (tarfile's extraction filters; Debian 12's own is 3.11.2).
PYTHON_OK := import sys; sys.exit(not (3, 11, 4) <= sys.version_info < (3, 12))
PYTHON ?= $(shell for p in $$(which -a python3.11 python3 2>/dev/null); do $$p -c '$(PYTHON_OK)' 2>/dev/null && echo $$p && break; done)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)

# The Python entry points set TF/ZenML/MLflow defaults themselves (xray/environment.py); these are for the zenml and
# mlflow CLI calls (make ui, make serve, the team stack's servers).
export ZENML_ANALYTICS_OPT_IN ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: pacs pacs-down node monitor-images setup system-packages lock lint test-fast stack team-stack team-stack-down team-stack-status train smoke quality test bench bench-ood monitor ui serve clean

# The locked dependencies, then this project in editable mode (pyproject.toml; setuptools comes from the lock).
# INSTALLER=uv (the default): uv, pinned and put into the venv by pip, installs the lock's exact set in parallel (9 s
# against pip's 100 s on this machine, docs/OPERATIONS.md "Development"). uv reads UV_INDEX_URL, UV_EXTRA_INDEX_URL
# and UV_FIND_LINKS (a hospital's package mirror), not pip's settings: `make setup INSTALLER=pip` installs with pip.
# --system-certs: the machine's certificate store, as pip's, so that a proxy's own CA installed there is trusted.
# --compile-bytecode: the .pyc files written once here, as pip does; uv leaves them to the first import, and where
# PYTHONDONTWRITEBYTECODE is set (this machine, many container images) every process then compiles TensorFlow, ZenML
# and MLflow again: 11.7 s instead of 6.0 s to import them (docs/OPERATIONS.md "Development").
INSTALLER ?= uv
UV_VERSION := 0.13.9
ifeq ($(INSTALLER),uv)
INSTALL := $(VENV)/bin/uv pip install --quiet --system-certs --compile-bytecode --python $(PY)
else ifeq ($(INSTALLER),pip)
INSTALL := $(PY) -m pip install --quiet
else
$(error INSTALLER=$(INSTALLER): uv or pip)
endif
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || { test -n "$(PYTHON)" && $(PYTHON) -c '$(PYTHON_OK)'; } || { echo "error: Python 3.11.4 or a later 3.11 is needed and none is on PATH (found: $$(which -a python3.11 python3 2>/dev/null | xargs -r -I{} sh -c '{} -V' | sort -u | paste -sd, -)); install one (pyenv, or your distribution's python3.11 update) or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements into $(VENV) with $(INSTALLER) (first time: about a minute with uv, several with pip)"
	$(if $(filter uv,$(INSTALLER)),$(PY) -m pip install --quiet uv==$(UV_VERSION) 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2))
	$(INSTALL) -r requirements.lock 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	$(INSTALL) --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# What make test needs beyond Python (the team stack's browser test and S3 endpoint, the PACS, the DICOM validators):
# installed when missing.
system-packages:
	@bash scripts/system_packages.sh

# requirements.lock: the exact set CI and `make setup` install, resolved by uv from requirements-dev.txt (which pulls
# requirements.txt and requirements-team.txt). Run after editing any requirements*.txt; commit the result.
lock:
	@test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile --system-certs requirements-dev.txt --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	  --custom-compile-command "make lock" --quiet -o requirements.lock

# ruff with the rules and line length in pyproject.toml ([tool.ruff]): lint rules, the formatting, then the import
# contract of docs/ARCHITECTURE.md ([tool.importlinter]: xray's stages in one order, no cycle, no ZenML in xray/),
# then what no package contract can say (scripts/check_boundaries.py: nothing outside tests/ imports tests/, nothing
# imports a benchmark), then mypy over the orchestration and the registry ([tool.mypy]: steps/, pipelines/, cli/,
# xray/registry/).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) scripts/check_boundaries.py
	$(VENV)/bin/mypy

# run.py picks the ZenML stack: STACK=name, else the active one if it has an MLflow experiment tracker, else
# xray-local (local orchestrator and artifact store, MLflow on ./.mlflow), registered on first use.
STACK_FLAG := $(if $(STACK),--stack $(STACK))
stack: setup
	@test -d .zen || $(VENV)/bin/zenml init

# The team stack on this machine (docs/OPERATIONS.md "Team stack"): ZenML server + dashboard, MLflow server on PostgreSQL with
# artifacts in S3 (s3rver, on disk), and the ZenML stack `team`. State in .team/ (kept by team-stack-down).
# Ports: XRAY_TEAM_ZENML_PORT (8237), XRAY_TEAM_MLFLOW_PORT (5050), XRAY_TEAM_S3_PORT (9010), XRAY_TEAM_PG_PORT (5433).
team-stack: setup
	@test -d .zen || $(VENV)/bin/zenml init
	$(PY) -m infra.team_stack up

# A local PACS: Orthanc with DICOMweb on http://127.0.0.1:$XRAY_PACS_PORT/dicom-web (8042) and its Web Viewer plugin, basic authentication with
# XRAY_PACS_USER / XRAY_PACS_PASSWORD (local defaults xray / xray-local-pacs), storage in .pacs/ (kept by pacs-down).
# It needs only a venv's Python: one that exists (a shared one included) is used as it is, never reinstalled from
# here; without one, make setup makes it.
$(PY):
	@$(MAKE) --no-print-directory setup

pacs: system-packages | $(PY)
	$(PY) -m infra.pacs up

pacs-down: | $(PY)
	$(PY) -m infra.pacs down

# The DICOM node (docs/OPERATIONS.md "DICOM node"): a Storage SCP on 127.0.0.1:$(NODE_PORT) as XRAY_AI, accepting the
# calling AE titles MODALITY and ORTHANC, analysing each study 10 s after its last instance with the champion of the
# active stack, and sending the results to NODE_DESTINATION (default: the local PACS of `make pacs`, over STOW-RS).
# Runs until Ctrl-C or SIGTERM (the batches in hand are finished first). Spool (patient data) in .node/spool.
NODE_PORT ?= 11112
NODE_DESTINATION ?= dicomweb://127.0.0.1:$${XRAY_PACS_PORT:-8042}/dicom-web
node: stack
	$(PY) run.py node $(STACK_FLAG) --port $(NODE_PORT) --destination $(NODE_DESTINATION)

team-stack-down: setup
	$(PY) -m infra.team_stack down

team-stack-status: setup
	$(PY) -m infra.team_stack status

train: stack
	$(PY) run.py train $(STACK_FLAG) --summary outputs/summary.json

smoke: stack
	$(PY) run.py train $(STACK_FLAG) --config configs/training_smoke.yaml --summary outputs/summary_smoke.json

# Model-quality recipe (issue #5): the real pipeline, then an independent reload of the registered version.
# `make quality SEED=7` replicates the recipe with another seed (val carve, shuffling) and keeps its own summary.
QUALITY_SUMMARY := outputs/summary_quality$(if $(SEED),_seed$(SEED)).json
quality: stack
	$(PY) run.py train $(STACK_FLAG) --config configs/training_quality_cpu.yaml $(if $(SEED),--seed $(SEED)) --summary $(QUALITY_SUMMARY)
	$(PY) scripts/verify_registered.py --summary $(QUALITY_SUMMARY)

# pytest-xdist workers. --dist loadfile keeps each test file on one worker (and the local stack's two files on one:
# tests/conftest.py SHARED_WORKER), so the team stack and the local run (session fixtures) are each built once and used
# in file order; --no-loadscope-reorder hands out
# files in collection order (pyproject.toml: the pipeline files first), not by test count. TEST_WORKERS=3 on this 2-core
# machine: the two pipeline files spend much of their time waiting on servers and subprocesses, and a third worker
# runs the unit files meanwhile (docs/OPERATIONS.md "Development" has the times). test-fast is CPU-bound: one worker per core.
# One TensorFlow/oneDNN thread per process in the suite: three workers (and their training subprocesses) share two
# cores, and TF's default of one thread per core in each of them oversubscribes the CPU (7 min 36 s of pytest with
# one thread against 7 min 59 s to 8 min 21 s without, fresh clones; docs/OPERATIONS.md "Development").
# No bytecode written while testing: TensorFlow's autograph imports the modules it generates from TMPDIR, and Python
# would leave their __pycache__ in each command's own TMPDIR, which the tests require empty (the .venv is compiled at
# install; a login shell without PYTHONDONTWRITEBYTECODE failed 46 of them).
TEST_THREADS ?= TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
TEST_WORKERS ?= 3
FAST_WORKERS ?= 2
test: setup system-packages
	$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The unit layer without the slow (training, subprocess) tests: the quick check while editing domain code.
UNIT_TESTS := tests/xray tests/cli tests/infra tests/materializers tests/project
test-fast: setup
	$(PY) -m pytest $(UNIT_TESTS) -m "not slow" -q -n $(FAST_WORKERS) --dist loadfile

bench: setup
	$(PY) benchmarks/bench.py

# Out-of-distribution detectors, the monitoring pipeline's acceptance runs and REST latency with the checks
# (docs/MONITORING.md); all against the champion of the local MLflow store, so run `make train` first.
bench-ood: setup
	$(PY) benchmarks/ood_detectors.py
	$(PY) benchmarks/monitoring_runs.py
	$(PY) benchmarks/serving_latency.py --requests 500

# A batch against the champion's reference profile: make monitor IMAGES=path/or/s3://prefix/ [OUTPUT=folder]
MONITOR_OUTPUT := $(or $(OUTPUT),outputs/monitoring)
monitor: monitor-images stack
	$(PY) run.py monitor $(STACK_FLAG) --images $(IMAGES) --output $(MONITOR_OUTPUT) \
	  --summary $(MONITOR_OUTPUT)/summary.json

monitor-images:
	@test -n "$(IMAGES)" || { echo "error: make monitor needs IMAGES=, the batch to check: a folder, a zip or an s3:// prefix (make monitor IMAGES=path/to/xrays [OUTPUT=outputs/monitoring])" >&2; exit 2; }

# Ports: make ui UI_PORT=5100, make serve SERVE_PORT=5101 (both listen on 127.0.0.1).
UI_PORT ?= 5000
SERVE_PORT ?= 5001
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlflow/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# The champion's files are checked against the digest recorded at registration before anything is served
# (infra/serve.py). Every answer goes to the prediction log: the active stack's (<artifact store>/prediction_log)
# unless XRAY_PREDICTION_LOG says otherwise (a folder, an s3:// prefix, or off).
serve: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/.mlflow/mlflow.db} \
	  XRAY_PREDICTION_LOG=$${XRAY_PREDICTION_LOG:-$$($(PY) -m infra.stacks prediction-log)} \
	  $(PY) -m infra.serve --model-version champion --host 127.0.0.1 --port $(SERVE_PORT) --workers $$(nproc)

clean:
	rm -rf .mlflow .cache outputs .pytest_cache
