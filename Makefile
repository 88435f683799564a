# Two commands on a fresh machine: `make demo` and `make test`. Each (re)creates .venv when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= work/demo
# `make demo` trains on real paintings when the shared ones are beside the checkout (or ARTNET_DATA and
# ARTNET_WEIGHTS name others); otherwise on a synthetic stand-in.
SHARED ?= ../shared
export ARTNET_DATA ?= $(wildcard $(SHARED)/data/paintings)
export ARTNET_WEIGHTS ?= $(wildcard $(SHARED)/weights/mobilenet_v2_1.0_224_imagenet1001.weights.h5)

.PHONY: demo test bench image clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/artnet demo --workdir $(WORKDIR)

# Three stages, each its own process: the main one (under 12 minutes on 2 cores), the longest end-to-end runs,
# then the tests that start Ray outside the test process.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not cluster and not long"
	$(VENV)/bin/python -m pytest -q -m "long and not cluster"
	$(VENV)/bin/python -m pytest -q -m cluster

bench: $(STAMP)
	$(VENV)/bin/python bench/pipeline.py

# The image cluster.yaml's nodes run (set its docker.image to the same name).
IMAGE ?= artnet:0.1.0
image:
	docker build -t $(IMAGE) .
	docker push $(IMAGE)

clean:
	rm -rf $(VENV) work .pytest_cache
