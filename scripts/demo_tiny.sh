#!/usr/bin/env bash
# The main job end to end on the embedded default (CPU, no network):
#   1. build the tiny LLaVA-1.5-shaped model + synthetic training data
#   2. fine-tune it with LoRASculpt (METHOD=... for another method) through the same script users run on
#      GPUs (scripts/finetune.sh), a few steps; prune after step 4
# Results: playground/demo/   (model, data, runs/...)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-playground/demo}
METHOD=${METHOD:-sculpt}
llava-sculpt tiny --output-dir "$DEMO/tiny" --seed 0
MODEL_BASE="$DEMO/tiny/model" DATA_PATH="$DEMO/tiny/data/train.json" IMAGE_FOLDER="$DEMO/tiny/data/images" \
  OUTPUT_DIR="$DEMO/runs/${METHOD}_tiny" NUM_GPUS=0 METHOD="$METHOD" RANK=8 \
  bash scripts/finetune.sh --max_steps 12 --per_device_train_batch_size 4 --learning_rate 1e-3 \
  --mm_projector_lr 1e-3 --save_steps 6 --disable_tqdm False \
  $( [ "$METHOD" = sculpt ] && echo --sculpt_step 4 )
echo
echo "demo finished: trained run in $DEMO/runs/${METHOD}_tiny (adapter_model.safetensors, mm_projector.safetensors)"
