# Two commands for a fresh machine; each creates .venv itself:
#   make demo   segment a generated sample volume (no model download, no torch needed)
#   make test   ruff and the whole pytest suite (installs torch, segment-anything, sam2 and the server)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint mutants bench bench-sam bench-server app screenshots system-packages clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# sam2's optional CUDA extension is skipped: MedFM does its own hole filling.
$(VENV)/.full: $(VENV)/.base pyproject.toml
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q -e ".[sam,sam2,server,openvino,evaluate,app,vista3d,nninteractive,finetune,ray,test]"
	touch $@

# What the app's headless tests draw with: OSMesa (VTK) and the X/xcb libraries Qt's plugins link to.
# Installed when this runs as root on Debian/Ubuntu; elsewhere the app's tests skip, naming the library.
SYSTEM_PACKAGES = libosmesa6 libgl1 libegl1 libx11-6 libxkbcommon0 libglib2.0-0 libfontconfig1 libfreetype6 \
	libdbus-1-3
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null) || \
		echo "make: could not install $(SYSTEM_PACKAGES): the app's tests will skip and say what is missing"; \
	else echo "make: not root on Debian: install $(SYSTEM_PACKAGES) for the app's tests"; fi

demo: $(VENV)/.base
	$(VENV)/bin/medfm demo --out-dir demo_output

lint: $(VENV)/.full
	$(PY) -m ruff check MedFM Testing

# Two workers: much of the suite waits on servers, subprocesses and Ray; each file stays on one worker.
# One compute thread per worker (and per subprocess it starts): with two workers on two cores, each extra
# OpenMP thread spins on the other worker's core. Measured: 12.2 min against 13.5-14.8 min, a third less CPU.
test: lint system-packages
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

# Deliberate bugs that the suite must catch, one at a time (Testing/mutation_check.py); about 15 minutes.
mutants: $(VENV)/.full
	$(PY) Testing/mutation_check.py

bench: $(VENV)/.full
	$(VENV)/bin/medfm bench --model classic

# The target from the core issue: full-size SAM ViT-B (random weights) on a 512×512 slice.
bench-sam: $(VENV)/.full
	$(VENV)/bin/medfm bench --model sam_vit_b --random-weights --device cpu

# Clicks through a local `medfm serve` (loopback) against the same clicks in-process: latency and bytes per click.
BENCH_TOKEN ?= bench-token-0123456789abcdef
BENCH_MODEL ?= classic
bench-server: $(VENV)/.full
	@MEDFM_TOKEN=$(BENCH_TOKEN) $(VENV)/bin/medfm serve --port 8765 --models $(BENCH_MODEL) --random-weights \
		--device cpu > bench-server.log 2>&1 & pid=$$!; trap "kill $$pid" EXIT; \
	for i in $$(seq 100); do MEDFM_TOKEN=$(BENCH_TOKEN) $(VENV)/bin/medfm models list --server http://127.0.0.1:8765 \
		>/dev/null 2>&1 && break; sleep 0.3; done; \
	MEDFM_TOKEN=$(BENCH_TOKEN) $(VENV)/bin/medfm bench --server http://127.0.0.1:8765 --model $(BENCH_MODEL) \
		--random-weights --device cpu

# The desktop app on the demo volume (a window; headless machines get Qt's offscreen platform).
app: $(VENV)/.full
	$(VENV)/bin/medfm demo --out-dir demo_output >/dev/null
	$(VENV)/bin/medfm app demo_output/demo_ct.nrrd

# The README's pictures of the app, made by replaying clicks through the real window.
screenshots: $(VENV)/.full system-packages
	$(PY) Resources/make_screenshots.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache bench-server.log
