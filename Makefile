# DvD — the two commands: `make serve` and `make test`. Everything else is set-up they call.
PYTHON     ?= $(shell command -v python3.11 || command -v python3)
VENV       := .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# x86-64: the test tools and vLLM's CPU build (extra "test"); elsewhere the test tools alone
EXTRAS     ?= $(if $(filter x86_64,$(shell uname -m)),test,dev)
CONFIG     ?= configs/tiny.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=
GPU_DEVICE ?= cuda:0
GPU_TESTS  := tests/e2e/test_equivalence.py tests/e2e/test_transports.py tests/e2e/test_colocated.py

.PHONY: install tcmalloc proto serve test test-gpu bench bench-vision bench-engine bench-transfer bench-bound tiny clean

install: $(VENV)/.installed

# Idempotent: re-runs only when pyproject.toml changes or the venv is missing. Beside torch's CPU
# build, PyPI's (CUDA) torchaudio and torchcodec fail at import, and vLLM runs without them.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(BIN)/python -m pip uninstall --quiet -y torchaudio torchcodec; fi
	$(BIN)/python -c "from pipeline.runtime.torchvision_ops import write_pth; print('torchvision import hook:', write_pth())"
	$(MAKE) --no-print-directory tcmalloc
	touch $@

# vLLM's CPU engine runs best with tcmalloc preloaded (language_server/vllm_engine/args.py does it when
# the library is there). Best effort: Debian's package, as root; without it vLLM runs, a little slower.
tcmalloc:
	@test -e /usr/lib/$(shell uname -m)-linux-gnu/libtcmalloc_minimal.so.4 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		  { apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
		    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }; }; } || \
		echo "note: libtcmalloc-minimal4 is not installed; vLLM's CPU engine will run without tcmalloc"

proto: install
	$(BIN)/python -m proto

tiny: proto
	$(BIN)/python -m pipeline tiny

serve: proto
	$(BIN)/python -m pipeline serve --config $(CONFIG)

test: proto
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# On a GPU machine: the end-to-end equivalence, transport and colocated checks with both servers
# and the transformers reference on $(GPU_DEVICE).
test-gpu: proto
	DVD_TEST_DEVICE=$(GPU_DEVICE) $(BIN)/python -m pytest -q $(PYTEST_ARGS) $(GPU_TESTS)

# Benchmarks (not tests): results go to benchmarks/results/ (git-ignored).
bench: proto
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

bench-vision: proto
	$(BIN)/python -m benchmarks.vision_throughput --vir $(BENCH_ARGS)

bench-engine: proto
	$(BIN)/python -m benchmarks.engine_throughput $(BENCH_ARGS)

bench-transfer: proto
	$(BIN)/python -m benchmarks.transfer $(BENCH_ARGS)

bench-bound: proto
	$(BIN)/python -m benchmarks.vllm_bound $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f proto/dvd/v1/*_pb2.py proto/dvd/v1/*_pb2.pyi proto/dvd/v1/*_pb2_grpc.py
