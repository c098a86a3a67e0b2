# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := proto/pdp/v1/pdp.proto proto/pdp/policy/v1/cel_input.proto

.PHONY: run test lint proto proto-check bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Serves the agent gRPC API on the embedded default: SQLite file, example policies, a dev agent,
# a signing key for audit checkpoints (all kept in the working directory: pdp.db, .pdp/). Next to it run
# the demo targets (a ticketing API on 127.0.0.1:8282, a SQLite CRM; credentials in .pdp/demo/) and the
# executor that carries out allowed actions on them. Ctrl-C, or any one of the three exiting, stops all three.
run: SHELL := /bin/bash
run: $(STAMP)
	$(BIN)/pdp db upgrade
	$(BIN)/pdp keys init
	$(BIN)/pdp agents ensure-dev
	$(BIN)/python -m demo.setup
	@echo 'starting the demo tickets API, pdp-executor and pdp serve (Ctrl-C stops all three)'; \
	pids=; trap 'kill $$pids 2>/dev/null; wait' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM; \
	$(BIN)/python -m demo.tickets & pids="$$pids $$!"; \
	$(BIN)/pdp-executor --config demo/executor.yaml & pids="$$pids $$!"; \
	$(BIN)/pdp serve & pids="$$pids $$!"; \
	wait -n

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) proto-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerates the committed stubs from proto/.
proto: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --mypy_out=. \
	  --grpc_python_out=. --mypy_grpc_out=. $(PROTOS)

# Fails when the committed stubs differ from what proto/ generates.
proto-check: $(STAMP)
	rm -rf build/proto-check && mkdir -p build/proto-check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=build/proto-check --mypy_out=build/proto-check \
	  --grpc_python_out=build/proto-check --mypy_grpc_out=build/proto-check $(PROTOS)
	diff -r -x __init__.py build/proto-check/pdp pdp -q 2>&1 | grep -v '^Only in pdp' \
	  && { echo 'stubs are stale: run make proto'; exit 1; } || true

bench: $(STAMP)
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.verify
	$(BIN)/python -m bench.execution
	$(BIN)/python -m bench.execution --database-url postgresql://postgres@127.0.0.1:5432/pdp_bench_exec
	$(BIN)/python -m bench.limits
	$(BIN)/python -m bench.limits --database-url postgresql://postgres@127.0.0.1:5432/pdp_bench_limits

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
