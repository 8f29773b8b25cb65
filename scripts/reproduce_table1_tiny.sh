#!/usr/bin/env bash
# reproduce_table1.sh, small, on the embedded default on CPU: the tiny model, synthetic fixtures of the six
# benchmarks in their raw formats, the paper's methods, a few training steps, a few questions per benchmark.
#   bash scripts/reproduce_table1_tiny.sh           (METHODS / RANKS / TARGETS choose; ~1 min per run)
# METHODS takes every name reproduce_table1.sh does (e.g. "spider asymlora lora-pissa"); the real mini Table 1
# of every method on a pre-trained tiny model is `make table1-tiny` (llava-sculpt demo --methods all).
#   OUT (default playground/table1_tiny of this repository) and PYTHON are relative to the folder you run it from.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_paths.sh"
project_python "$(dirname "$HERE")"
resolve_paths OUT
cd "$HERE/.."
OUT=${OUT:-playground/table1_tiny}
need_output_dir OUT
"$PYTHON" -m llava_sculpt.cli tiny --output-dir "$OUT/tiny" --seed 0 > /dev/null
for dataset in iconqa coco okvqa ocrvqa gqa textvqa; do
  if [ ! -f "$OUT/data/$dataset/manifest.json" ]; then
    "$PYTHON" -c "from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture as w; import sys; w(sys.argv[1], sys.argv[2], seed=0, n=8)" \
      "$dataset" "$OUT/raw/$dataset"
    "$PYTHON" -m llava_sculpt.cli prepare "$dataset" --raw-dir "$OUT/raw/$dataset" --out-dir "$OUT/data/$dataset" > /dev/null
  fi
done
MODEL_BASE="$OUT/tiny/model" DATA_ROOT="$OUT/data" RUNS_DIR="$OUT/runs" NUM_GPUS=0 \
  METHODS=${METHODS:-"lora dora l2 orth tailor dare sculpt"} RANKS=${RANKS:-"4 8"} TARGETS=${TARGETS:-"iconqa coco"} \
  MAX_QUESTIONS=${MAX_QUESTIONS:-4} MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-8} BATCH_SIZE=4 \
  TRAIN_ARGS="--max_steps 4 --per_device_train_batch_size 2 --learning_rate 1e-3 --sculpt_step 2 --tailor_samples 4 --save_strategy no --disable_tqdm True" \
  bash "$HERE/reproduce_table1.sh"
for t in ${TARGETS:-iconqa coco}; do echo; cat "$OUT/runs/table1_$t.md"; done
