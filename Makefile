# The two quick-start commands: `make demo` and `make test`. Each sets up .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# the venv's tools (ninja, which torch's C++ extension builder runs by name) on PATH without activating it
export PATH := $(abspath $(VENV))/bin:$(PATH)
# the extras `make setup` installs: if one does not import, that is an installation bug, never a skipped test
EXTRAS_IMPORT := import transformers, accelerate, lightning.pytorch, datasets, lm_eval, mup

.PHONY: demo test setup lint clean

# the Makefile too: a changed recipe (the torch pin, the mup line) must reach existing venvs
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a CPU wheel; a loose requirement with no torch present would pull CUDA packages
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,lab,hf,lightning,data,eval]"
	# mup: a test oracle for width scaling only (never a dependency of layerwise); --no-deps because its
	# requirements name torchvision, which would replace the torch above (it needs only torch and pyyaml)
	$(PY) -m pip install -q --no-deps "mup==1.0.0"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layerwise demo

test: $(STAMP)
	$(PY) -c "$(EXTRAS_IMPORT)"
	$(PY) -m pytest tests

# lint and type check (configured in pyproject.toml); .ci/run runs it before `make test`
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) runs
