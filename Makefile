# Two commands for a fresh machine; each creates .venv itself:
#   make demo   segment a generated sample volume (no model download, no torch needed)
#   make test   ruff and the whole pytest suite (installs torch, segment-anything, sam2 and the server)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench bench-sam clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# sam2's optional CUDA extension is skipped: MedFM does its own hole filling.
$(VENV)/.full: $(VENV)/.base
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q -e ".[sam,sam2,server,test]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/medfm demo --out-dir demo_output

lint: $(VENV)/.full
	$(PY) -m ruff check MedFM Testing

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.full
	$(VENV)/bin/medfm bench --model classic

# The target from the core issue: full-size SAM ViT-B (random weights) on a 512×512 slice.
bench-sam: $(VENV)/.full
	$(VENV)/bin/medfm bench --model sam_vit_b --random-weights --device cpu

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache
