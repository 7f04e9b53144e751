# sdbuild — set-up, demo, tests and benchmarks. Everything runs in a local virtual environment (.venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@# users bring their own torch; when none is importable, install the CPU build first (a plain `torch` pulls CUDA)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sdbuild synth --demo recipes/models
	$(VENV)/bin/sdbuild recipes/demo.yaml
	$(VENV)/bin/sdbuild recipes/lora-demo.yaml
	$(VENV)/bin/sdbuild inspect recipes/out/demo-mix.safetensors

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -p no:cacheprovider -n auto tests

bench: install
	$(PY) bench/run.py

clean:
	rm -rf cache recipes/out recipes/models bench/work .pytest_cache
