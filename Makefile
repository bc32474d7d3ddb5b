# Two commands: `make demo` and `make test`. Both build .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench-speed bench-hetero bench-condense bench-regression bench-lm bench-lm-peers bench-crossmodal bench-vl bench-dense clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,text]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crossdistill demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py

bench-hetero: $(STAMP)
	$(BIN)/python benchmarks/hetero.py

bench-condense: $(STAMP)
	$(BIN)/python benchmarks/condense.py

bench-regression: $(STAMP)
	$(BIN)/python benchmarks/regression.py --compare benchmarks/results/regression_before.json

bench-lm: $(STAMP)
	$(BIN)/python benchmarks/lm.py

bench-crossmodal: $(STAMP)  # cross-modal and missing-modality KD (issue 13)
	$(BIN)/python benchmarks/crossmodal.py

bench-vl: $(STAMP)  # vision-language, retrieval and semi-supervised KD (issue 14)
	$(BIN)/python -c "import sentence_transformers" 2>/dev/null || $(BIN)/python -m pip install -q -c constraints.txt -e ".[peers]"
	$(BIN)/python benchmarks/vl.py

bench-dense: $(STAMP)  # segmentation and detection KD on digit canvases (issue 15)
	$(BIN)/python benchmarks/dense.py

bench-lm-peers: $(STAMP)  # TRL side by side (the optional peers extra)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[peers]"
	$(BIN)/python benchmarks/lm_peers.py
