# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck bench clean

venv: $(STAMP)

# torch==2.13.0 first: it is a CPU build that pip finds locally; an unpinned torch would pull a
# multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[hf,pg,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bitplan demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping, so it reads the code through a tree of links
# that has the installed layout (bitplan/app -> app, …). Strict on the library layers.
TYPECHECK := $(VENV)/typecheck
typecheck: $(STAMP)
	mkdir -p $(TYPECHECK)/bitplan
	ln -sfn $(CURDIR)/bitplan/__init__.py $(TYPECHECK)/bitplan/__init__.py
	for pkg in app search sensitivity migrations; do ln -sfn $(CURDIR)/$$pkg $(TYPECHECK)/bitplan/$$pkg; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml --strict -p bitplan.search -p bitplan.sensitivity

# Run as modules: benchmarks/sensitivity.py would otherwise shadow the sensitivity package.
# Each script records its own section of benchmarks/RESULTS.md with the machine and date.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.sensitivity
	$(BIN)/python -m benchmarks.frontier
	$(BIN)/python -m benchmarks.frontier_speed
	$(BIN)/python -m benchmarks.api_load

clean:
	rm -rf $(VENV) .bitplan bitplan-demo
