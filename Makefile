# eightbit — every target sets up what it needs in .venv (only Python is assumed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install test lint demo bench bench-quick gpu-check clean

help:
	@echo "make demo       train a small model with torch AdamW and eightbit AdamW8bit side by side"
	@echo "make test       run the test suite (sets up .venv first)"
	@echo "make lint       ruff"
	@echo "make bench      benchmarks against torch.optim, bitsandbytes and torchao (< 10 min)"
	@echo "make bench-quick  the same, a one-minute look"
	@echo "make gpu-check  on a machine with a GPU (no network): GPU tests and GPU benchmarks"

$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

# The peers of requirements/bench.txt (bitsandbytes, torchao) go into .venv for the benchmarks
# only, one at a time with torch held at its dev pin. A peer that cannot be installed is not an
# error: the tables show it as "not installed". The stamp is written only when all of them
# installed, so a failed one is retried next time.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	@ok=1; for req in $$(grep -Ev '^[[:space:]]*(#|-|$$)' requirements/bench.txt); do \
	  $(PY) -m pip install -q -c requirements/dev.txt "$$req" \
	    || { ok=0; echo "make bench: could not install $$req; it shows as 'not installed'"; }; \
	done; if [ $$ok = 1 ]; then touch $@; fi

bench: $(BENCH_STAMP)
	$(PY) -m tests.benchmarks.run

bench-quick: $(BENCH_STAMP)
	$(PY) -m tests.benchmarks.run --quick

# On a machine with a GPU, torch (CUDA), CuPy and pytest, and no network: no venv, nothing
# downloaded. eightbit is installed in place without dependencies (if that fails, for lack of
# setuptools, the script imports the source tree through a shim); then the `gpu` tests and the
# GPU benchmarks run (< 5 min) and the tables land in $(GPU_CHECK_OUT)/results.md.
GPU_CHECK_OUT ?= gpu-check-out

gpu-check:
	-$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
