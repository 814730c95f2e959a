# Two commands a newcomer types: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-all lint demo bench clean

# torch is pinned in pyproject.toml and resolved in the same pip command as
# deepspeed, so deepspeed never pulls a multi-GB CUDA torch on a CPU machine. The fused CPU op
# (nsa/ops/cpu_build.py) and DeepSpeed's shared-memory collectives op (which its CPU backend
# JIT-builds at the first deepspeed.initialize) are compiled here, once per machine, not inside
# the first test or training run.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@echo "building the fused CPU op (once, ~30 s; without a compiler: one warning, the torch paths)"
	$(PY) -c "from nsa.ops import cpu_build; cpu_build.load()"
	@echo "building DeepSpeed's shared-memory comm op (once, ~30 s)"
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" || \
		echo "warning: DeepSpeed's shm comm op did not build here; DeepSpeed will try again at its first start"
	touch $(STAMP)

setup: $(STAMP)

# `make test` runs in TEST_WORKERS processes (pytest-xdist), a test module's tests in one worker so
# its module fixtures (test_zero's ZeRO runs) are built once: on 2 cores 2:56 against 5:12 in one
# process, most tests being single-threaded (the Triton interpreter) or process start-up.
# `make test-all` (the slow fault tests: kills timed against a running job) stays in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q --durations=15 -n $(TEST_WORKERS) --dist loadscope

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check nsa train data eval bench tests

# The main job on an embedded default: NSA and full attention trained side by side on the
# Python standard library, evaluated and compared (outputs/demo/report.md). Finished steps
# are not redone on a second run.
demo: $(STAMP)
	PYTHON=$(abspath $(PY)) bash launch/demo.sh

clean:
	rm -rf $(VENV) outputs
