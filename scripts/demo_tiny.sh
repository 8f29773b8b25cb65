#!/usr/bin/env bash
# The main job end to end on the embedded default (CPU, no network):
#   1. build the tiny LLaVA-1.5-shaped model + synthetic training data
#   2. fine-tune it with LoRASculpt (METHOD=... for another method) through the same script users run on
#      GPUs (scripts/finetune.sh), a few steps, pruning after step 4
#   3. write synthetic fixtures of the six benchmarks in their official raw formats, `llava-sculpt prepare`
#      them, and evaluate the run on the target (IconQA) and the four sources with the same script users run
#      (scripts/eval_source_target.sh), printing its Table 1 row (the tiny random model scores near 0: the
#      point is the pipeline)
# Results: playground/demo/   (tiny/, runs/, data/, the run's eval/ with answers, scores and the table, and
# logs/ with each stage's full output; the terminal gets one line per stage with the elapsed time)
# DEMO (default playground/demo of this repository) is relative to the folder you run the script from.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_paths.sh"
resolve_paths DEMO
cd "$HERE/.."
DEMO=${DEMO:-playground/demo}
need_output_dir DEMO
METHOD=${METHOD:-sculpt}
RUN="$DEMO/runs/${METHOD}_tiny"
LOGS="$DEMO/logs"

prepare_fixtures() {
  for dataset in iconqa okvqa ocrvqa gqa textvqa; do
    python -c "from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture as w; import sys; w(sys.argv[1], sys.argv[2], seed=0, n=8)" \
      "$dataset" "$DEMO/raw/$dataset"
    llava-sculpt prepare "$dataset" --raw-dir "$DEMO/raw/$dataset" --out-dir "$DEMO/data/$dataset"
  done
}

echo "llava-sculpt demo: $METHOD on the embedded tiny model -> $DEMO (full output of each stage in $LOGS/)"
stage "$LOGS/tiny.log" "building the tiny LLaVA-1.5-shaped model and synthetic training data" \
  llava-sculpt tiny --output-dir "$DEMO/tiny" --seed 0
stage "$LOGS/train.log" "fine-tuning it with --method $METHOD (12 steps on CPU)" \
  env MODEL_BASE="$DEMO/tiny/model" DATA_PATH="$DEMO/tiny/data/train.json" IMAGE_FOLDER="$DEMO/tiny/data/images" \
  OUTPUT_DIR="$RUN" NUM_GPUS=0 METHOD="$METHOD" LORA_R=8 \
  bash scripts/finetune.sh --max_steps 12 --per_device_train_batch_size 4 --learning_rate 1e-3 \
  --mm_projector_lr 1e-3 --save_steps 6 --disable_tqdm True \
  $( [ "$METHOD" = sculpt ] && echo --sculpt_step 4 )
stage "$LOGS/prepare.log" "writing fixtures of IconQA and the four source benchmarks, llava-sculpt prepare" \
  prepare_fixtures
MODEL="$RUN"
case $METHOD in dare|tailor|intruders) MODEL="$RUN/merged" ;; esac
stage "$LOGS/eval.log" "evaluating the run on IconQA (target) and the four sources, 8 questions each" \
  env DATA_ROOT="$DEMO/data" EVAL_DIR="$RUN/eval" NUM_GPUS=0 MAX_QUESTIONS=8 MAX_NEW_TOKENS=8 METHOD="$METHOD" \
  LORA_R=8 bash scripts/eval_source_target.sh "$MODEL" iconqa
echo
llava-sculpt table "$RUN/eval"
echo "demo finished in ${SECONDS}s:"
echo "  trained run      $RUN  (adapter_model.safetensors, mm_projector.safetensors, run_args.json)"
[ "$METHOD" = sculpt ] && echo "  LoRASculpt       $RUN/sparsity.json, adapter_sparse.safetensors; plot: llava-sculpt report $RUN"
echo "  evaluation       $RUN/eval  (answers/, scores/, run_meta.json)"
echo "  logs             $LOGS  (tiny, train, prepare, eval)"
