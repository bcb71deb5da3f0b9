# Two commands do everything on a fresh machine:  `make sample`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= a large red striped circle at the top left and a blue square on a dark background

TOY := models/toy

.PHONY: sample test test-fast lint mutate bench toy recipe evaluate web web-deps clean

# TORCH_INDEX: install torch from another PyTorch wheel index first (README, 'Install'), e.g. the CPU-only build
TORCH_INDEX ?=

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 --index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import snapfusion_min"
	touch $@

$(VENV)/.plots: $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check -e '.[plots]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import matplotlib"
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import diffusers, transformers, pytest"
	touch $@

$(VENV)/.onnx: $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check -e '.[onnx]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import onnx, onnxruntime"
	touch $@

sample: $(VENV)/.runtime  ## install, then sample an image with the bundled model
	$(PY) sample.py --prompt "$(PROMPT)" --out-dir samples $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)")

lint: $(VENV)/.dev  ## ruff, and the house's import layers (pyproject.toml: [tool.importlinter])
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

test: $(VENV)/.dev lint web-deps  ## install, lint, run the test suite (two workers; then the full-size models, one at a time)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not full_size"
	$(PY) -m pytest -q -m full_size $$(grep -l "mark.full_size" tests/test_*.py)  # collect only their files

test-fast: $(VENV)/.dev lint  ## the suite without the full-size and end-to-end tests (about 2 minutes)
	$(PY) -m pytest -q -m "not slow and not full_size" -n 2 --dist loadfile

mutate: $(VENV)/.dev  ## do the tests catch faults? planted ones, then mutmut on diffusion.py + distill.py (long: docs/testing.md)
	$(PY) tests/plant_faults.py
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 > /dev/null || true
	$(VENV)/bin/mutmut results
	$(VENV)/bin/mutmut export-cicd-stats > /dev/null
	$(PY) -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); n = s['total'] - s['skipped']; \
	k = s['killed'] + s['timeout']; print(f'mutmut: {k} of {n} mutants killed ({100 * k / n:.1f}%)')"

bench: $(VENV)/.dev  ## speed ratios, each measured side by side in one run (docs/speed.md)
	$(PY) bench/unet_speed.py
	$(PY) bench/unet_presets.py
	$(PY) bench/latency_table.py
	$(PY) bench/decoder_prune.py
	$(PY) bench/bf16_psnr.py
	$(PY) bench/table1_sd.py
	$(PY) bench/runtimes.py

toy: $(VENV)/.plots  ## retrain every bundled toy model from scratch (models/toy/README.md)
	$(PY) train.py clip --out $(TOY)/clip.safetensors
	$(PY) train.py autoencoder --out $(TOY)/autoencoder.safetensors
	$(PY) train.py unet --arch toy --clip $(TOY)/clip.safetensors --autoencoder $(TOY)/autoencoder.safetensors \
		--out $(TOY)/model.safetensors
	$(PY) evaluate.py heldout --dtype float32 --grid docs/toy_heldout_samples.png

recipe: $(VENV)/.plots  ## the whole SnapFusion recipe at toy scale -> report/README.md
	$(PY) recipe.py

evaluate: $(VENV)/.runtime  ## judge the bundled toy model on held-out prompts
	$(PY) evaluate.py --dtype float32

# the browser page's models: the bundled teacher (with the text encoder and decoder), its 8-step distilled student,
# and the robust-trained UNet exported with a keep input (its block toggles); tests/test_web_page.py exports the same
WEB_STUDENT ?= $(TOY)/student.safetensors
WEB_ROBUST ?= $(TOY)/robust.safetensors

web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error

web/vendor/ort.wasm.min.mjs: web/node_modules/.package-lock.json
	mkdir -p web/vendor
	cp web/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs web/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs \
		web/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm web/vendor/

web-deps:  ## onnxruntime-web vendored into web/vendor/, and playwright-core for the browser tests (needs npm)
	@if ! command -v npm > /dev/null; then echo "npm is not installed: web/vendor/ not made (the browser tests will be skipped)"; \
	elif ! $(MAKE) --no-print-directory web/vendor/ort.wasm.min.mjs; then \
		echo "npm could not install web/'s packages: the browser tests will be skipped"; fi

web: $(VENV)/.onnx web-deps  ## the paper in a browser tab: ONNX files, onnxruntime-web, a local server
	@test -f web/vendor/ort.wasm.min.mjs || { echo "make web needs npm to fetch onnxruntime-web (web/package.json)"; exit 1; }
	$(PY) export.py --to onnx --out-dir web/models/teacher
	$(PY) export.py --to onnx --parts unet --checkpoint $(WEB_STUDENT) --out-dir web/models/student
	$(PY) export.py --to onnx --parts unet --keep-input --checkpoint $(WEB_ROBUST) --out-dir web/models/robust
	cp report/fig2_latency.png web/models/latency.png
	@echo "open http://localhost:8000 (Ctrl-C stops the server)"
	$(PY) -m http.server --directory web --bind 127.0.0.1 8000

clean:
	rm -rf $(VENV) samples .pytest_cache mutants web/node_modules web/vendor web/models
