# featurebank: `make test` and `make demo` do their own set-up on a machine with only python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO  := protos/featurebank/v1/featurebank.proto

.PHONY: install test test-all lint bench bench-smoke demo protos source-model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy featurebank
	$(BIN)/lint-imports

BENCHMARKS := $(filter-out benchmarks/_%,$(wildcard benchmarks/*.py))

bench: install
	@for b in $(BENCHMARKS); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Every benchmark's --quick (small data, seconds each): fails when any of them exits non-zero,
# so a rename, an import break or a missed precondition fails CI.
bench-smoke: install
	@failed=""; for b in $(BENCHMARKS); do \
	  echo "== $$b --quick"; start=$$(date +%s); \
	  $(BIN)/python $$b --quick || failed="$$failed $$b"; \
	  echo "== $$b: $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "bench-smoke FAILED:$$failed"; exit 1; fi; \
	echo "bench-smoke: every benchmark's --quick passed"

protos: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --mypy_out=. $(PROTO)

source-model: install
	$(BIN)/python -m featurebank.embedder.source_model

demo: install
	$(BIN)/python -m featurebank.demo

clean:
	rm -rf demo-bank demo-data .pytest_cache .mypy_cache .ruff_cache
