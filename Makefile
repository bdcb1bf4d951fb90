# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv and
# installs what it needs when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: test demo venv test-ref test-fast lessons clean gpu-check bench

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The whole suite: the pytest tree (CUDA simulator on, set in tests/conftest.py), then the
# PTX/NVRTC compile checks and the Numba driver-class checks in their own process with the
# simulator off, then the lessons.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests
	NUMBA_ENABLE_CUDASIM=0 $(PY) -m pytest -q -n 2 -p no:cacheprovider tests/compile_checks.py tests/numba_driver_checks.py
	$(MAKE) lessons

# The lessons: build notebooks from the jupytext sources (lessons/NN_*.py, the one source of
# truth) into lessons/_notebooks (git-ignored), then run every notebook top to bottom.
# (Not lessons/_build: nbmake never collects a path with a "_build" folder in it.)
LESSONS := $(wildcard lessons/[0-9][0-9]_*.py)
lessons: $(STAMP)
	rm -rf lessons/_notebooks && mkdir -p lessons/_notebooks
	for f in $(LESSONS); do $(PY) -m jupytext --quiet --to ipynb --output lessons/_notebooks/$$(basename $$f .py).ipynb $$f || exit 1; done
	PYTHONPATH=$(CURDIR) $(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=900 -n 2 --durations=0 lessons/_notebooks

demo: $(STAMP)
	$(PY) -m sparx_ref.demo $(ARGS)

gpu-check: $(STAMP)
	./scripts/gpu-check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis lessons/_notebooks
