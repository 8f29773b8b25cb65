"""llava-sculpt: fine-tune LLaVA-1.5 on a downstream task without forgetting (LoRASculpt, CVPR 2025).

Importing the package sets OMP_WAIT_POLICY=PASSIVE, unless it is already set (to anything) or torch is already
imported.  Every entry point (`llava-sculpt ...`, `python -m llava_sculpt.<module>`, `llava_sculpt/train.py`
run as a script) imports this package before torch, so the setting reaches libgomp, which reads it once, when
torch loads it.  Why: with libgomp's default spin-waiting, CPU training and generation ran 4-9x slower while
another process used a core (paired 20-step runs: 38 s and 93 s by default, 10 s and 10 s with PASSIVE, same
loss); on an idle machine `make bench` (omp row) measures the two side by side.
"""
import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
