# Two commands on a fresh machine: `make demo` and `make test`. Each (re)creates .venv when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= work/demo

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/artnet demo --workdir $(WORKDIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not cluster"
	$(VENV)/bin/python -m pytest -q -m cluster

bench: $(STAMP)
	$(VENV)/bin/python bench/pipeline.py

clean:
	rm -rf $(VENV) work .pytest_cache
