#!/usr/bin/env bash
# Evaluate a fine-tuned model on the four source benchmarks (OKVQA, OCRVQA, GQA, TextVQA) and its target
# (IconQA or COCO-Caption), then print its row of the paper's Table 1.
#
#   DATA_ROOT=/data/eval scripts/eval_source_target.sh MODEL_PATH [TARGET]
#   scripts/eval_source_target.sh            (no DATA_ROOT, no MODEL_PATH: the embedded default, below)
#
# With neither MODEL_PATH nor DATA_ROOT given, the script evaluates the embedded default: the run that
# `bash scripts/finetune_${METHOD:-sculpt}_${TARGET:-iconqa}.sh` wrote with no path variables set
# (${RUNS_DIR:-playground/runs}/${METHOD}_${TARGET}_r${LORA_R}_tiny) on the synthetic world's benchmarks (`llava-sculpt
# world`), on CPU, and says so on its first line.
#
# MODEL_PATH  a `llava-sculpt train` run / checkpoint dir (adapter + projector, no merge needed; give
#             MODEL_BASE when the adapter's recorded base is not a local folder) or a merged HF checkpoint.
# TARGET      iconqa | coco (default: $TARGET, else inferred from MODEL_PATH/run_args.json).
# Variables:
#   DATA_ROOT      required: DATA_ROOT/{okvqa,ocrvqa,gqa,textvqa,iconqa,coco} are `llava-sculpt prepare`
#                  output folders (see eval/*.json for the files each benchmark uses)
#   WORLD_DIR      embedded default only: the tiny model and its data (default playground/tiny_world)
#   EVAL_DIR       run directory for run_meta.json, answers/, scores/ (default MODEL_PATH/eval)
#   MODEL_BASE     base checkpoint of an adapter
#   METHOD, LORA_R   run_meta.json values (default: run_args.json "method" and training_args.lora_r)
#   BATCH_SIZE     questions per generate() call (default 8)
#   OVERWRITE=1    discard answers/scores in EVAL_DIR written by another model or other settings
#   ADOPT=1        adopt answer files from before answers recorded what produced them
#   MAX_QUESTIONS  first N questions per benchmark, for smoke runs (exactly those N are scored)
#   MAX_NEW_TOKENS override the specs' max_new_tokens (128)
#   CONV_MODE      override the specs' conversation template (vicuna_v1)
#   NUM_GPUS       chunk processes (default: all visible GPUs; CPU: one process)
#   COMPAT         official (default) | paper: the LoRASculpt release's scorers
#   BENCHMARKS     benchmarks to run (default "okvqa ocrvqa gqa textvqa" + the target)
#   SPEC_DIR       folder of the benchmark specs (default: eval/ of this repository)
#   PYTHON         the interpreter of every step (default: this repository's .venv/bin/python, made by `make
#                  install`, when it exists, else python on PATH)
# Paths (MODEL_PATH, DATA_ROOT, EVAL_DIR, MODEL_BASE, SPEC_DIR, PYTHON) are relative to the folder you run
# the script from; MODEL_PATH and DATA_ROOT are checked before anything is written.
# Rerunning resumes: answered questions are skipped, complete benchmarks are only re-scored.
set -euo pipefail

if [ $# -gt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || { [ $# -eq 0 ] && [ -n "${DATA_ROOT:-}" ]; }; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_paths.sh"
project_python "$(dirname "$HERE")"
if [ $# -eq 0 ]; then
    METHOD=${METHOD:-sculpt} TARGET=${TARGET:-iconqa} LORA_R=${LORA_R:-32}
    [ -z "${RUNS_DIR:-}" ] || RUNS_DIR=$(realpath -m -s -- "$RUNS_DIR")
    MODEL_PATH="${RUNS_DIR:-$(dirname "$HERE")/playground/runs}/${METHOD}_${TARGET}_r${LORA_R}_tiny"
    echo "no MODEL_PATH and no DATA_ROOT: evaluating the embedded default ($MODEL_PATH on the synthetic world," \
         "CPU). For LLaVA-1.5-7B: DATA_ROOT=/data/eval $0 MODEL_PATH [TARGET]." >&2
    [ -d "$MODEL_PATH" ] || { echo "error: $MODEL_PATH does not exist; train it first with" \
        "\`METHOD=$METHOD LORA_R=$LORA_R bash scripts/finetune_${METHOD}_${TARGET}.sh\` (no path variables set)" >&2; exit 2; }
    [ -z "${WORLD_DIR:-}" ] || WORLD_DIR=$(realpath -m -s -- "$WORLD_DIR")
    world=$(cd "$(dirname "$HERE")" && "$PYTHON" -m llava_sculpt.cli world --shell \
            --world-dir "${WORLD_DIR:-$(dirname "$HERE")/playground/tiny_world}" \
            --benchmarks "okvqa,ocrvqa,gqa,textvqa,$TARGET") || { echo "error: could not build the embedded default" >&2; exit 2; }
    eval "$world"
    NUM_GPUS=0 MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-$([ "$TARGET" = coco ] && echo 24 || echo 10)}
    MODEL_BASE=  # `world --shell` sets it; a run's adapter records its base
fi
[ $# -eq 0 ] || MODEL_PATH=$1
TARGET=${2:-${TARGET:-}}
if [ -z "${DATA_ROOT:-}" ]; then
    echo "error: set DATA_ROOT to the folder holding the prepared benchmarks (DATA_ROOT/okvqa, DATA_ROOT/gqa, ...," >&2
    echo "       each the --out-dir of \`llava-sculpt prepare\`), e.g. DATA_ROOT=/data/eval $0 $*" >&2
    exit 2
fi
resolve_paths MODEL_PATH DATA_ROOT EVAL_DIR MODEL_BASE SPEC_DIR
need_dir MODEL_PATH "a \`llava-sculpt train\` run or checkpoint folder, or a merged Hugging Face checkpoint"
need_dir DATA_ROOT "the folder holding the \`llava-sculpt prepare\` outputs, DATA_ROOT/okvqa, DATA_ROOT/gqa, ..."
[ -z "${MODEL_BASE:-}" ] || need_model MODEL_BASE "the base checkpoint of the adapter"
[ -z "${SPEC_DIR:-}" ] || need_dir SPEC_DIR "a folder of benchmark specs like eval/"
export LLAVA_SCULPT_SPEC_DIR=${SPEC_DIR:-$(dirname "$HERE")/eval}
EVAL_DIR=${EVAL_DIR:-$MODEL_PATH/eval}
need_output_dir EVAL_DIR
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}

args=(--model-path "$MODEL_PATH" --data-root "$DATA_ROOT" --eval-dir "$EVAL_DIR" --num-gpus "$NUM_GPUS"
      --batch-size "${BATCH_SIZE:-8}" --compat "${COMPAT:-official}")
[ -n "${MODEL_BASE:-}" ] && args+=(--model-base "$MODEL_BASE")
[ -n "${MAX_QUESTIONS:-}" ] && args+=(--max-questions "$MAX_QUESTIONS")
[ "${OVERWRITE:-0}" = 1 ] && args+=(--overwrite)
[ "${ADOPT:-0}" = 1 ] && args+=(--adopt)
[ -n "${MAX_NEW_TOKENS:-}" ] && args+=(--max-new-tokens "$MAX_NEW_TOKENS")
[ -n "${CONV_MODE:-}" ] && args+=(--conv-mode "$CONV_MODE")
[ -n "${METHOD:-}" ] && args+=(--method "$METHOD")
[ -n "${LORA_R:-}" ] && args+=(--rank "$LORA_R")
[ -n "$TARGET" ] && args+=(--target "$TARGET")
if [ -n "${BENCHMARKS:-}" ]; then
    read -r -a benchmarks <<< "$BENCHMARKS"
else
    benchmarks=(okvqa ocrvqa gqa textvqa)
    args+=(--add-target)
fi

echo "evaluating $MODEL_PATH on ${benchmarks[*]}$([ -z "${BENCHMARKS:-}" ] && echo " + target") with $NUM_GPUS GPU(s) -> $EVAL_DIR" >&2
"$PYTHON" -m llava_sculpt.eval.run_benchmark "${benchmarks[@]}" "${args[@]}"
"$PYTHON" -m llava_sculpt.cli table "$EVAL_DIR"
