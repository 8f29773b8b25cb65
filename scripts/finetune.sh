#!/usr/bin/env bash
# Fine-tune LLaVA-1.5 with one method at the paper's Table 1 settings (LoRASculpt, CVPR'25, Sec. 4.1):
# LoRA rank R (16/32/64) with alpha 2R, dropout 0.05 on every LM linear; projector fully trained at 2e-5;
# AdamW lr 2e-4, no weight decay, cosine, warm-up 0.03; 3 epochs; 4 GPUs x batch 4; bf16 + tf32;
# gradient checkpointing; DeepSpeed ZeRO-2; model_max_length 2048.
#
# Usage:  METHOD=sculpt TARGET=iconqa bash scripts/finetune.sh [extra llava-sculpt train flags...]
# Variables (paths are required, with a message when missing):
#   MODEL_BASE     HF LLaVA-1.5 checkpoint folder (llava-1.5-7b-hf, or `llava-sculpt convert` output)
#   DATA_PATH      LLaVA training JSON of the target task (`llava-sculpt prepare TARGET ...` writes train.json)
#   IMAGE_FOLDER   folder the JSON's image paths are relative to
#   METHOD         lora | sculpt | dora | l2 | orth | dare | tailor   (default lora)
#   TARGET         iconqa | coco (only names the run)          LORA_R   16 | 32 | 64 (default 32)
#   OUTPUT_DIR     default playground/runs/${METHOD}_${TARGET}_r${LORA_R}
#   NUM_GPUS       default: all visible GPUs; 0 = CPU smoke run (no DeepSpeed, fp32, no tf32)
#   DS_CONFIG      default configs/zero2.json
# Extra arguments are passed to `llava-sculpt train` last, so they override the settings above
# (e.g. --max_steps 5 --per_device_train_batch_size 2 for a smoke run, or method flags like --sculpt_ratio 0.05).
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD=${METHOD:-lora}
TARGET=${TARGET:-iconqa}
LORA_R=${LORA_R:-32}
need() { if [ -z "${!1:-}" ]; then echo "error: set $1 ($2)" >&2; exit 2; fi; }
need MODEL_BASE "a local Hugging Face LLaVA-1.5 checkpoint, e.g. MODEL_BASE=checkpoints/llava-1.5-7b-hf"
need DATA_PATH "the LLaVA training JSON, e.g. DATA_PATH=playground/data/${TARGET}/train.json"
need IMAGE_FOLDER "the folder its image paths are relative to"
OUTPUT_DIR=${OUTPUT_DIR:-playground/runs/${METHOD}_${TARGET}_r${LORA_R}}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
DS_CONFIG=${DS_CONFIG:-configs/zero2.json}

args=(
  --method "$METHOD"
  --model_name_or_path "$MODEL_BASE" --version v1
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER"
  --image_aspect_ratio pad --group_by_modality_length True
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
  --mm_use_im_start_end False --mm_use_im_patch_token False
  --lora_enable True --lora_r "$LORA_R" --lora_alpha $((2 * LORA_R)) --lora_dropout 0.05
  --mm_projector_lr 2e-5 --learning_rate 2e-4 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
  --num_train_epochs 3 --per_device_train_batch_size 4 --gradient_accumulation_steps 1
  --model_max_length 2048 --gradient_checkpointing True --lazy_preprocess True
  --save_strategy steps --save_steps 500 --save_total_limit 2 --logging_steps 1
  --dataloader_num_workers 4 --report_to none
  --output_dir "$OUTPUT_DIR"
)
mkdir -p "$OUTPUT_DIR"
if [ "$NUM_GPUS" -gt 0 ]; then
  exec deepspeed --num_gpus "$NUM_GPUS" llava_sculpt/train.py "${args[@]}" \
    --deepspeed "$DS_CONFIG" --bf16 True --tf32 True --attn_implementation "${ATTN:-sdpa}" "$@"
else
  echo "no GPU: CPU run without DeepSpeed, fp32 (use the embedded model: see README)" >&2
  exec python -m llava_sculpt.train "${args[@]}" --dataloader_num_workers 0 "$@"
fi
