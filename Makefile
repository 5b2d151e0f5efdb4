# One-command set-up: `make test` and `make demo` create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-all test-scale demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps "open_clip_torch>=2.24"  # only its CLIP BPE vocabulary (see pyproject)
	touch $@

install: $(VENV)/.installed

# the default run (CI): every test but the long multi-process ones marked slow (each has a quick version here)
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu and not slow" tests

# everything a CPU can run, slow ones included (about twice as long)
test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu" tests

# the scale-out engines: FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes, slow ones included (installs the
# deepspeed extra; its first launch compiles DeepSpeed's CPU communication op, about 3 minutes)
test-scale: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[deepspeed]"
	$(PY) -m pytest -q -m "not gpu" tests/integration/test_train_fsdp.py tests/integration/test_train_deepspeed.py \
		tests/unit/train/test_engine.py

demo: $(VENV)/.installed
	$(VENV)/bin/diffusion-dpo demo --output-dir demo_out

bench: $(VENV)/.installed
	$(VENV)/bin/diffusion-dpo bench --arch mid

clean:
	rm -rf $(VENV) .pytest_cache
