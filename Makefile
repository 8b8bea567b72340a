# `make demo` and `make test` do all set-up themselves (a virtual environment in .venv).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-all lint bench reliability clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/aikd demo --out demo_out --overwrite

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

reliability: install  # docs/reliability.md from the runs of tests/test_reliability.py
	AIKD_WRITE_RELIABILITY=1 $(PY) -m pytest -q tests/test_reliability.py

lint: install
	$(VENV)/bin/ruff check src tests bench

bench: install
	$(PY) bench/score.py
	$(PY) bench/train.py
	$(PY) bench/detect.py
	$(PY) bench/evaluate.py
	$(PY) bench/dlib_template.py
	$(PY) bench/models.py
	$(PY) bench/int8.py
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
