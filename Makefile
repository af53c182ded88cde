# FreehandUS: `make demo` and `make test` work on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install native demo test benchmark clean

install: $(STAMP) native

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[learning,dev,native]"
	touch $(STAMP)

# The C insertion kernels (PLUS arithmetic without numba's start-up); rebuilt when their sources
# change. Optional: without a compiler reconstruction uses the numba kernels.
NATIVE := FreehandUS/FreehandUSLib/reconstruction/native
native: $(NATIVE)/libfreehandus_plus.so

$(NATIVE)/libfreehandus_plus.so: $(wildcard $(NATIVE)/*.c $(NATIVE)/*.h) $(NATIVE).py $(STAMP)
	$(BIN)/python -m FreehandUSLib.reconstruction.native_build --optional

demo: install
	$(BIN)/freehandus demo --out results/demo

test: install
	$(BIN)/python -m pytest -q

benchmark: install
	$(BIN)/python -m pytest -q Testing/benchmarks -o python_files='bench_*.py'

clean:
	rm -rf $(VENV) results .pytest_cache build *.egg-info $(NATIVE)/libfreehandus_plus.so
