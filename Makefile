# The README's two commands: `make demo` and `make test`. Each builds .venv on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first so that pip never resolves the multi-GB CUDA build.
# Users with a GPU: make TORCH_SPEC="torch" test
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo reliability venv clean

venv: $(STAMP)

# Reinstall only when pyproject.toml (or the torch spec) changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The full reliability suite (make test runs its quick subset).
reliability: $(STAMP)
	ZOO_RELIABILITY=full $(PY) -m pytest -q tests/reliability

demo: $(STAMP)
	$(PY) -m zoo list

clean:
	rm -rf $(VENV) runs build *.egg-info
