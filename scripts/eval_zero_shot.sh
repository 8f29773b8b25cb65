#!/usr/bin/env bash
# Evaluate the base model zero-shot on all six benchmarks (run_meta: method "zero-shot", rank null,
# target null, so its row appears in both the IconQA and the COCO table).
#
#   DATA_ROOT=/data/eval scripts/eval_zero_shot.sh BASE_MODEL_PATH
#
# Same variables as scripts/eval_source_target.sh (EVAL_DIR default BASE_MODEL_PATH/eval, BATCH_SIZE,
# MAX_QUESTIONS, MAX_NEW_TOKENS, CONV_MODE, NUM_GPUS, COMPAT, OVERWRITE, ADOPT, PYTHON); BENCHMARKS defaults
# to all six.
set -euo pipefail
if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
METHOD=zero-shot BENCHMARKS=${BENCHMARKS:-"okvqa ocrvqa gqa textvqa iconqa coco"} \
    exec "$HERE/eval_source_target.sh" "$1"
