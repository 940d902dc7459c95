# One name for every command. `make help` lists them.
# Model packages are built with the Python feature release of the hosts that serve them (the service's
# check refuses another one): .venv uses Ubuntu 24.04's, 3.12. OS=NAME (make demo OS=debian-12) takes that
# OS's Python instead, with a venv and models of its own (.venv-3.11, models-py3.11); docs/support.md.
OS_PYTHON_ubuntu-24.04 := 3.12
OS_PYTHON_ubuntu-22.04 := 3.11
OS_PYTHON_debian-12    := 3.11
OS_PYTHON_debian-13    := 3.13
ifneq ($(OS),)
ifeq ($(OS_PYTHON_$(OS)),)
$(error OS=$(OS) is not a sandbox OS: choose ubuntu-24.04, ubuntu-22.04, debian-12 or debian-13)
endif
HOST_PYTHON ?= $(OS_PYTHON_$(OS))
endif
HOST_PYTHON ?= 3.12
ifneq ($(HOST_PYTHON),3.12)
VENV   ?= .venv-$(HOST_PYTHON)
MODELS ?= models-py$(HOST_PYTHON)
endif
PYTHON ?= $(firstword $(foreach p,python$(HOST_PYTHON) $(wildcard $(HOME)/.pyenv/versions/$(HOST_PYTHON).*/bin/python$(HOST_PYTHON)) /usr/bin/python$(HOST_PYTHON),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
VENV   ?= .venv
BIN    := $(VENV)/bin
MODELS ?= models
export MLAPI_MODELS_DIR ?= $(MODELS)
export MLAPI_DEFAULT_MODEL ?= iris

.DEFAULT_GOAL := help
.PHONY: help setup venv venv-python models serve test test-fast config-reference demo demo-cluster down bench bench-quick

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: ## install system packages (as root) and the venv
	scripts/setup-host.sh

venv: venv-python $(BIN)/.installed ## create the venv with every Python dependency and the mlapi command

venv-python:
	@test -x $(BIN)/python || exit 0; $(BIN)/python -c 'import sys; sys.exit(sys.version.startswith("$(HOST_PYTHON)."))' || exit 0; \
		echo "make venv: $(VENV) has Python $$($(BIN)/python -c 'import platform; print(platform.python_version())'), not $(HOST_PYTHON): packages built with it are refused on the hosts; rm -rf $(VENV) and run make venv again (or set HOST_PYTHON)" >&2; exit 1

# The project itself (the mlapi command) goes in last, editable and without dependencies: the pins of the
# requirements are the versions, and a change to app/ needs no reinstall.
$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml $(wildcard scripts/harness/client_envs/*.txt)
	@test -x $(BIN)/python || test -n "$(PYTHON)" || { echo "make venv: no Python $(HOST_PYTHON) found; install python$(HOST_PYTHON) (with venv; Ubuntu 24.04 has it, elsewhere pyenv) or name one: make venv PYTHON=/path/to/python$(HOST_PYTHON); for hosts of Python 3.11 (Debian 12, Ubuntu 22.04): make venv HOST_PYTHON=3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(not sys.version.startswith("$(HOST_PYTHON)."))' || { echo "make venv: $(PYTHON) is not Python $(HOST_PYTHON): packages built with it are refused on hosts of Python $(HOST_PYTHON); name a python$(HOST_PYTHON), or set HOST_PYTHON to this one's 3.x" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	test "$(HOST_PYTHON)" != 3.12 || $(BIN)/python -m scripts.harness.client_envs  # the clients' venvs, for the tests and the bench
	touch $@

models: venv ## train and package the demo models unless they exist and pass the check in this venv
	@(for m in iris iris-logreg diabetes churn; do $(BIN)/mlapi verify $(MODELS)/$$m/1 >/dev/null 2>&1 || exit 1; done) \
		|| $(BIN)/mlapi train-demo --force --models-dir $(MODELS)

serve: models ## run the service under gunicorn on 127.0.0.1:8000, gRPC on 127.0.0.1:8500 (Ctrl-C stops it)
	$(BIN)/mlapi serve --workers $${MLAPI_WORKERS:-2} --grpc $${MLAPI_GRPC_BIND:-127.0.0.1:8500}

test: venv ## run the whole test suite: unit, integration and end-to-end
	$(BIN)/pytest -n 2

test-fast: venv ## unit and integration tests only (no sandbox hosts)
	$(BIN)/pytest -n 2 -m "not e2e"

# The sandbox's vault password comes from its file (0600): no prompt.
PLAYBOOK := ANSIBLE_CONFIG=deploy/ansible/ansible.cfg $(BIN)/ansible-playbook \
	-i deploy/ansible/inventories/sandbox -i .sandbox/inventory/hosts.yml --vault-password-file .sandbox/vault-password \
	-e app_models_src=$(abspath $(MODELS))
SANDBOX_OS := $(if $(OS),--os $(OS))

demo: setup models ## as root: a sandbox host provisioned by site.yml, serving HTTPS with a local ACME CA (OS=NAME)
	scripts/sandbox/sandbox up --hosts 1 $(SANDBOX_OS)
	$(PLAYBOOK) deploy/ansible/site.yml
	@scripts/sandbox/demo-info

demo-cluster: setup models ## as root: a load balancer (lb, redis) and two app hosts, provisioned by site.yml (OS=NAME)
	scripts/sandbox/sandbox up --hosts 3 $(SANDBOX_OS)
	$(PLAYBOOK) deploy/ansible/site.yml
	@scripts/sandbox/demo-info

down: ## remove the sandbox hosts completely (the cached root filesystem stays)
	scripts/sandbox/sandbox down

bench: venv ## as root: the full benchmark (about 25 minutes on 2 cores, a sandbox host of its own included)
	@command -v wrk >/dev/null && command -v nginx >/dev/null || scripts/setup-host.sh
	$(BIN)/python -m bench.run

bench-quick: venv ## every benchmark figure but provisioning, short and small (what CI runs as a smoke test)
	@command -v wrk >/dev/null && command -v nginx >/dev/null || scripts/setup-host.sh
	$(BIN)/python -m bench.run --quick

config-reference: venv ## print every MLAPI_* setting as a Markdown table
	@$(BIN)/python -m app.settings --markdown
