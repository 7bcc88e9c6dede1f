# Every target bootstraps .venv from the pinned lock when it is missing or stale.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint bench lock clean

$(STAMP): requirements.lock requirements-torch.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-torch.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)             ## the main job on its embedded default
	$(PY) -m experiments.train_lm

# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set (this sandbox sets it): the suite starts dozens of Python
# processes (2 workers, trainers, multihost peers) that each recompiled our modules and re-rewrote pytest's asserts
# from source (a collection 14 -> 9 CPU-s, an import of the trainers 2.6 -> 2.2 CPU-s).
test: $(STAMP)             ## the whole suite (8 fake CPU devices), then lint
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests $(PYTEST_ARGS)
	$(VENV)/bin/ruff check .

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.train_step

lock:                      ## refresh the locks from the current venv (after changing pins)
	$(PY) -m pip freeze --exclude-editable | grep -v -e '^-e' -e '^torch==' > requirements.lock
	$(PY) -m pip freeze | grep '^torch==' | grep -q '+cpu$$'  # the CPU build, or the lock would fetch CUDA's GBs
	sed -i '/^torch==/d' requirements-torch.lock && $(PY) -m pip freeze | grep '^torch==' >> requirements-torch.lock

clean:
	rm -rf $(VENV) .pytest_cache runs
