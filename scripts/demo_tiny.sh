#!/usr/bin/env bash
# The README's main job on CPU (what `make demo` runs): the paper's Table 1 in miniature.
#   `llava-sculpt demo`: pre-train (once, cached in playground/tiny_world) a tiny LLaVA-1.5-shaped model on the
#   four source skills of a synthetic world, fine-tune it on the IconQA-style target with LoRA and LoRASculpt
#   at two ranks and three seeds with evaluation during training, evaluate every run on the four sources and
#   the target, and write the Table 1 layout (mean ± std), summary.json, Fig. 3 and Fig. 5.
# Results: DEMO (default playground/demo of this repository; relative to the folder you run the script from).
# Extra arguments go to `llava-sculpt demo` (see `llava-sculpt demo --help`), e.g. --seeds 0 --ranks 8.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_paths.sh"
project_python "$(dirname "$HERE")"
resolve_paths DEMO
cd "$HERE/.."
DEMO=${DEMO:-playground/demo}
need_output_dir DEMO
exec "$PYTHON" -m llava_sculpt.cli demo --out "$DEMO" "$@"
