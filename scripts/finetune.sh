#!/usr/bin/env bash
# Fine-tune LLaVA-1.5 with one method at the paper's Table 1 settings (LoRASculpt, CVPR'25, Sec. 4.1):
# LoRA rank R (16/32/64) with alpha 2R, dropout 0.05 on every LM linear; projector fully trained at 2e-5;
# AdamW lr 2e-4, no weight decay, cosine, warm-up 0.03; 3 epochs; 4 GPUs x batch 4; bf16 + tf32;
# gradient checkpointing; DeepSpeed ZeRO-2; model_max_length 2048.
#
# Usage:  METHOD=sculpt TARGET=iconqa bash scripts/finetune.sh [extra llava-sculpt train flags...]
# Variables (paths are relative to the folder you run the script from, like any command's; the inputs are
# checked, with a message naming the variable and the path, before anything is created):
# With none of MODEL_BASE, DATA_PATH, IMAGE_FOLDER set, the script runs on the EMBEDDED DEFAULT: the demo's
# pre-trained tiny LLaVA and the synthetic TARGET world (`llava-sculpt world`, built once into
# playground/tiny_world, ~2 min on 2 CPU cores), on CPU, with the demo's settings for the tiny model
# (`llava-sculpt world --shell --train-flags METHOD` prints them) and OUTPUT_DIR
# ${RUNS_DIR:-playground/runs}/${METHOD}_${TARGET}_r${LORA_R}_tiny; it says so on its first line.
#   WORLD_DIR      embedded default only: where the tiny model and its data are (default playground/tiny_world)
#   MODEL_BASE     HF LLaVA-1.5 checkpoint folder (llava-1.5-7b-hf, or `llava-sculpt convert` output)
#   DATA_PATH      LLaVA training JSON of the target task (`llava-sculpt prepare TARGET ...` writes train.json)
#   IMAGE_FOLDER   folder the JSON's image paths are relative to
#   METHOD         lora | sculpt | dora | l2 | orth | dare | tailor | intruders | spider | magnitude_mask |
#                  asymlora (default lora), or lora-INIT = lora with --init_lora_weights INIT (gaussian, pissa,
#                  olora, eva, corda; lora-corda is CorDA-KPM and needs CORDA_DATA below)
#   CORDA_DATA     METHOD=lora-corda: a LLaVA training JSON of SOURCE-task samples (CORDA_IMAGE_FOLDER: its
#                  image folder, default IMAGE_FOLDER); the embedded default brings its own
#   TARGET         iconqa | coco (only names the run)          LORA_R   16 | 32 | 64 (default 32)
#   OUTPUT_DIR     default playground/runs/${METHOD}_${TARGET}_r${LORA_R} in this repository
#   NUM_GPUS       GPUs per node; default: all visible GPUs; 0 = CPU smoke run (no DeepSpeed, fp32, no tf32)
# Several nodes (MASTER_ADDR / MASTER_PORT are used only with HOSTFILE or NNODES; see _paths.sh, check_launch):
#   HOSTFILE       DeepSpeed's hostfile (`hostname slots=N` lines): run this script on ONE node (the first host),
#                  DeepSpeed's launcher starts the others over ssh/pdsh; NUM_NODES = use its first N hosts;
#                  NUM_GPUS, when set, is the GPUs each host uses (DeepSpeed's --num_gpus: ids 0..N-1; unset: the
#                  slots); MASTER_ADDR default: the first host's address
#   NNODES         torchrun instead (`python -m torch.distributed.run`): run this script on EVERY node (e.g. srun,
#                  one task per node) with the same NNODES, MASTER_ADDR (node 0's address; required when NNODES >
#                  1), MASTER_PORT (default 29500) and each node's own NODE_RANK in [0, NNODES); NUM_GPUS
#                  processes a node; the Trainer starts DeepSpeed itself from DS_CONFIG
#   global batch   per_device_train_batch_size (4) x gradient_accumulation_steps (1) x GPUs a node x nodes: the
#                  paper's 16 on 4 GPUs; pass both flags to keep a global batch on more GPUs (README)
#   DRY_RUN        1 = print the launch command (one line, shell-quoted, PYTHONPATH=... first) and exit 0 without
#                  starting anything; the inputs are checked as for a real run; the embedded default is refused
#                  (its command names the tiny model `llava-sculpt world` would first build)
#   DS_CONFIG      default configs/zero2.json of this repository
#   PYTHON         the interpreter of every step (default: this repository's .venv/bin/python, made by `make
#                  install`, when it exists, else python on PATH)
# Extra arguments are passed to `llava-sculpt train` last, so they override the settings above
# (e.g. --max_steps 5 --per_device_train_batch_size 2 for a smoke run, or method flags like --sculpt_ratio 0.05).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
source "$HERE/_paths.sh"
project_python "$REPO"
resolve_paths MODEL_BASE DATA_PATH IMAGE_FOLDER OUTPUT_DIR DS_CONFIG WORLD_DIR RUNS_DIR CORDA_DATA CORDA_IMAGE_FOLDER
check_launch

METHOD=${METHOD:-lora}
TARGET=${TARGET:-iconqa}
LORA_R=${LORA_R:-32}
TINY_TRAIN_FLAGS=()
if [ -z "${MODEL_BASE:-}${DATA_PATH:-}${IMAGE_FOLDER:-}" ]; then
  for name in HOSTFILE NNODES; do
    [ -z "${!name:-}" ] || script_error "$name is set, but MODEL_BASE, DATA_PATH and IMAGE_FOLDER are not: the" \
      "embedded default (the demo's tiny model) trains on this machine's CPU; set them for a run on several nodes"
  done
  [ "${DRY_RUN:-0}" = 0 ] || script_error "DRY_RUN=1 needs MODEL_BASE, DATA_PATH and IMAGE_FOLDER: the embedded" \
    "default's command names the tiny model that \`llava-sculpt world\` builds first (minutes), which a dry run does not do"
  echo "MODEL_BASE, DATA_PATH and IMAGE_FOLDER are not set: fine-tuning the embedded default (the demo's pre-trained" \
       "tiny LLaVA on the synthetic $TARGET world, CPU). For LLaVA-1.5-7B set MODEL_BASE=checkpoints/llava-1.5-7b-hf" \
       "DATA_PATH=playground/data/$TARGET/train.json IMAGE_FOLDER=<its image folder>. It saves a checkpoint at each" \
       "epoch end: rerun the same command after an interruption and it resumes from there." >&2
  world=$(cd "$REPO" && "$PYTHON" -m llava_sculpt.cli world --shell --world-dir "${WORLD_DIR:-$REPO/playground/tiny_world}" \
          --benchmarks "okvqa,ocrvqa,gqa,textvqa,$TARGET" \
          --target "$TARGET" --train-flags "$METHOD") || script_error "could not build the embedded default (llava-sculpt world)"
  eval "$world"
  target_upper=$(echo "$TARGET" | tr '[:lower:]' '[:upper:]')
  data_var=${target_upper}_DATA_PATH image_var=${target_upper}_IMAGE_FOLDER
  MODEL_BASE=$MODEL_BASE DATA_PATH=${!data_var} IMAGE_FOLDER=${!image_var}
  OUTPUT_DIR=${OUTPUT_DIR:-${RUNS_DIR:-$REPO/playground/runs}/${METHOD}_${TARGET}_r${LORA_R}_tiny}
  NUM_GPUS=0
fi
need_model MODEL_BASE "a local Hugging Face LLaVA-1.5 checkpoint, e.g. MODEL_BASE=checkpoints/llava-1.5-7b-hf"
need_file DATA_PATH "the LLaVA training JSON, e.g. DATA_PATH=playground/data/${TARGET}/train.json"
need_dir IMAGE_FOLDER "the folder its image paths are relative to"
[[ $LORA_R =~ ^[1-9][0-9]*$ ]] || script_error "LORA_R=$LORA_R is not a positive integer (the LoRA rank: 16, 32 or 64)"
OUTPUT_DIR=${OUTPUT_DIR:-$REPO/playground/runs/${METHOD}_${TARGET}_r${LORA_R}}
need_output_dir OUTPUT_DIR
TRAIN_METHOD=$METHOD INIT_FLAGS=()
case $METHOD in
  lora-*)
    TRAIN_METHOD=lora INIT_FLAGS=(--init_lora_weights "${METHOD#lora-}")
    if [ "$METHOD" = lora-corda ] && [ ${#TINY_TRAIN_FLAGS[@]} -eq 0 ]; then  # the embedded default has its own
      need_file CORDA_DATA "a LLaVA training JSON of SOURCE-task samples whose layer-input covariances orient CorDA"
      INIT_FLAGS+=(--corda_method kpm --corda_data "$CORDA_DATA" --corda_image_folder "${CORDA_IMAGE_FOLDER:-$IMAGE_FOLDER}")
    fi ;;
esac
if [ -z "${NUM_GPUS:-}" ] && [ -z "${HOSTFILE:-}" ]; then  # with a hostfile its slots say how many
  NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
[[ ${NUM_GPUS:-1} =~ ^[0-9]+$ ]] || script_error "NUM_GPUS=$NUM_GPUS is not a number of GPUs (0 = CPU run)"
if [ -n "${HOSTFILE:-}${NNODES:-}" ] && [ "${NUM_GPUS:-1}" -eq 0 ]; then
  script_error "NUM_GPUS=0 (a CPU run on this machine, or no GPU seen here) with ${HOSTFILE:+HOSTFILE}${NNODES:+NNODES}:" \
    "a run on several nodes needs GPUs; set NUM_GPUS to the GPUs per node${HOSTFILE:+ or unset it (then the slots of the hostfile count)}"
fi
DS_CONFIG=${DS_CONFIG:-$REPO/configs/zero2.json}
[ "${NUM_GPUS:-1}" -eq 0 ] || need_file DS_CONFIG "a DeepSpeed config, e.g. configs/zero2.json"
# no cd: extra arguments with paths (--resume_from_checkpoint ...) stay relative to the caller's folder too

args=(
  --method "$TRAIN_METHOD" ${INIT_FLAGS[@]+"${INIT_FLAGS[@]}"}
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
train=("$REPO/llava_sculpt/train.py" "${args[@]}"
       --deepspeed "$DS_CONFIG" --bf16 True --tf32 True --attn_implementation "${ATTN:-sdpa}" "$@")
# launch: exec, or with DRY_RUN=1 print the command; DeepSpeed's launcher (the `deepspeed` command) and torchrun are
# run by PYTHON, so every rank runs PYTHON too
if [ -n "${HOSTFILE:-}" ]; then
  launch "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" ${NUM_NODES:+--num_nodes "$NUM_NODES"} \
    ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
    ${MASTER_PORT:+--master_port "$MASTER_PORT"} "${train[@]}"
elif [ -n "${NNODES:-}" ]; then
  launch "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NUM_GPUS" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} "${train[@]}"
elif [ "$NUM_GPUS" -gt 0 ]; then
  launch "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" "${train[@]}"
else
  [ ${#TINY_TRAIN_FLAGS[@]} -gt 0 ] || echo "no GPU: CPU run without DeepSpeed, fp32 (use the embedded model: see README)" >&2
  launch "$PYTHON" -m llava_sculpt.train "${args[@]}" --dataloader_num_workers 0 "${TINY_TRAIN_FLAGS[@]}" "$@"
fi
