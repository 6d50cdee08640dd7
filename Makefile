# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates or reuses a virtual environment in $(VENV); torch is pinned to the CPU wheel
# available here (an ordinary CUDA wheel elsewhere) and installed before the package, which
# is built with --no-build-isolation so that no build step pulls a second torch.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-interpret test-cuda bench bench-cpu bench-gpu bench-step bench-loader bench-embeddings compile-check compile-cuda lint clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q ninja  # the C++ extension below builds in parallel with it
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llp-fast-train

test: $(STAMP)
	$(PY) -m pytest -q

test-interpret: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton

test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-enable

bench-cpu: $(STAMP)
	$(PY) bench/bench_propagate.py --shapes cpu,sweep
	$(PY) bench/bench_local_density.py --shapes cpu,sweep
	$(PY) bench/bench_aggregation_loss.py --shapes cpu
	$(PY) bench/bench_bank_update.py

bench-gpu: $(STAMP)
	$(PY) bench/run_gpu.py

bench-step: $(STAMP)
	$(PY) bench/bench_step_overhead.py

bench-loader: $(STAMP)
	$(PY) bench/bench_loader.py

bench-embeddings: $(STAMP)
	$(PY) bench/bench_embeddings.py table
	$(PY) bench/bench_embeddings.py scale --n 5000,50000,200000
	$(PY) bench/bench_embeddings.py bar --n 1000000

compile-check: $(STAMP)
	$(PY) tests/_compile_kernels.py 90 80

compile-cuda: $(STAMP)
	.ci/compile_cuda.sh $(PY)

lint: $(STAMP)
	$(VENV)/bin/ruff check llp_fast kernels tests bench
	$(VENV)/bin/ruff format --check llp_fast kernels tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf build *.egg-info $(VENV) llp_fast/_C*.so
