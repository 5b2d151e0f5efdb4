# One-command set-up: `make test` and `make demo` create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps "open_clip_torch>=2.24"  # only its CLIP BPE vocabulary (see pyproject)
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu" tests

demo: $(VENV)/.installed
	$(VENV)/bin/diffusion-dpo demo --output-dir demo_out

bench: $(VENV)/.installed
	$(VENV)/bin/diffusion-dpo bench --arch mid

clean:
	rm -rf $(VENV) .pytest_cache
