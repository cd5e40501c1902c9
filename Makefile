# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck bench clean

venv: $(STAMP)

# torch==2.13.0 first: it is a CPU build that pip finds locally; an unpinned torch would pull a
# multi-GB CUDA build. llama-cpp-python compiles llama.cpp: without -march=native (GGML_NATIVE=OFF),
# because a native build on a CPU with AMX tiles crashed (SIGSEGV in its first eval) in a virtual
# machine that does not grant the AMX state; the portable build runs anywhere.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF $${CMAKE_ARGS:-}" $(BIN)/python -m pip install --quiet -e '.[hf,pg,runtimes,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bitplan demo

# The report's browser test needs Chromium: installed from Debian's packages when it is missing
# and we are root (CI, containers); otherwise that one test skips and says why (fails in CI).
test: $(STAMP)
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { echo "installing chromium for the report's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium fonts-dejavu-core >/dev/null || echo "could not install chromium"; }
	$(BIN)/python -m pytest -q

lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping, so it reads the code through a tree of links
# that has the installed layout (bitplan/app -> app, …). Strict on the whole package. Its cache
# lives beside the links, not under them: a cold run reads torch's and transformers' types
# (about 2 minutes on 2 cores), a warm one only what changed (seconds).
TYPECHECK := $(VENV)/typecheck
MYPY_CACHE := $(VENV)/mypy-cache
typecheck: $(STAMP)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/bitplan  # no stale links to deleted files
	for f in bitplan/*.py; do ln -sfn $(CURDIR)/$$f $(TYPECHECK)/bitplan/; done
	for pkg in app search sensitivity migrations; do ln -sfn $(CURDIR)/$$pkg $(TYPECHECK)/bitplan/$$pkg; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
	  --cache-dir $(CURDIR)/$(MYPY_CACHE) --strict -p bitplan

# Run as modules: benchmarks/sensitivity.py would otherwise shadow the sensitivity package.
# Each script records its own section of benchmarks/RESULTS.md with the machine and date.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.sensitivity
	$(BIN)/python -m benchmarks.frontier
	$(BIN)/python -m benchmarks.frontier_speed
	$(BIN)/python -m benchmarks.api_load
	$(BIN)/python -m benchmarks.service_limits
	$(BIN)/python -m benchmarks.runtimes
	$(BIN)/python -m benchmarks.distributed  # needs PostgreSQL at 127.0.0.1:5432
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.blockwise_memory
	$(BIN)/python -m benchmarks.chunk_size

clean:
	rm -rf $(VENV) .bitplan bitplan-demo
