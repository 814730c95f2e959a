# Two commands a newcomer types: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-all lint demo bench clean

# torch is pinned in pyproject.toml and resolved in the same pip command as
# deepspeed, so deepspeed never pulls a multi-GB CUDA torch on a CPU machine. The fused CPU op
# (nsa/ops/cpu_build.py) is compiled here for this CPU, not inside the first test or run.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@echo "building the fused CPU op (once, ~30 s; without a compiler: one warning, the torch paths)"
	$(PY) -c "from nsa.ops import cpu_build; cpu_build.load()"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q --durations=15

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
