# Two entry points for a fresh machine (see README):
#   make demo   the main job end to end on the embedded tiny model (CPU, a few minutes)
#   make demo-forgetting   the paper's trade-off in miniature (~5 min)
#   make test   the test suite
# Each creates .venv when missing and installs torch 2.13.0 (CPU wheel) first when the venv has no torch,
# so pip never resolves a newer (CUDA, multi-GB) torch.  PYTHON picks the interpreter for the venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llava-sculpt-installed

.PHONY: install demo demo-forgetting test clean-demo

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[dev,eval,deepspeed,quant]"
	$(PY) -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo_tiny.sh

demo-forgetting: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo_forgetting_tiny.sh

test: $(STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf playground/demo playground/demo_forgetting
