#!/usr/bin/env bash
# Every row of the paper's Table 1: methods x ranks x targets -> train, evaluate on the target and the
# four sources, then one Table 1-layout table per target (markdown + csv).
#
#   MODEL_BASE=checkpoints/llava-1.5-7b-hf DATA_ROOT=/data/eval bash scripts/reproduce_table1.sh
#
# Variables:
#   MODEL_BASE   required: HF LLaVA-1.5 checkpoint folder
#   DATA_ROOT    required: DATA_ROOT/{iconqa,coco,okvqa,ocrvqa,gqa,textvqa} are `llava-sculpt prepare` outputs;
#                a target's train.json is its training data, its manifest.json names the image folder
#   RUNS_DIR     default playground/table1 of this repository (RUNS_DIR/TARGET/METHOD_rLORA_R/ per run,
#                RUNS_DIR/zero-shot/)
#   METHODS      default "lora dora l2 orth tailor dare intruders asymlora magnitude_mask spider lora-gaussian
#                lora-pissa lora-olora lora-eva [lora-corda] sculpt": the paper's Table 1 methods plus the related
#                ones (README, "Methods"); magnitude_mask and spider fine-tune the last layers without LoRA: they
#                are trained once per target and listed in the first rank's group; lora-INIT is `--method lora
#                --init_lora_weights INIT` (PEFT's initialisations); lora-corda (CorDA, knowledge-preserving
#                mode) is in the default list when CORDA_DATA is set
#   CORDA_DATA   a LLaVA training JSON of SOURCE-task samples (e.g. a slice of LLaVA-665k) whose layer-input
#                covariances orient lora-corda's adapter; CORDA_IMAGE_FOLDER: where its images are (default:
#                the target's image folder)
#   RANKS        default "16 32 64"          TARGETS  default "iconqa coco"
#   TRAIN_ARGS   extra `llava-sculpt train` flags for every run (e.g. "--max_steps 3" for a smoke run)
#   NUM_GPUS, BATCH_SIZE, MAX_QUESTIONS, MAX_NEW_TOKENS, COMPAT, PYTHON: see finetune.sh / eval_source_target.sh
#   HOSTFILE [NUM_NODES MASTER_ADDR MASTER_PORT]  each training run on several nodes through DeepSpeed's launcher
#                (finetune.sh; checked before anything starts); the evaluations run on this node. torchrun's NNODES
#                is refused (it would need this whole script on every node, each one evaluating too)
#   DRY_RUN      1 = print each run's training command (finetune.sh's DRY_RUN, one line a run on stdout; finished
#                runs are skipped) and nothing else: no zero-shot, transform, evaluation or table
#   ALLOW_NON_KARPATHY  set to 1 to accept a DATA_ROOT/coco that is not a Karpathy split (its manifest.json
#                says karpathy false, e.g. lmms-lab(-encoder)/COCO-Caption's val2014 or val2017): by default
#                the script refuses it, since the paper's COCO CIDEr is on the Karpathy test split
# DARE, Model Tailor, intruders are evaluated on their merged checkpoint (RUN/merged). Rerunning continues where it
# stopped: finished runs (training_complete.json) are not retrained and generation resumes.
# Model Tailor runs with --tailor_compat official: the authors' release (compensation added, kept set chosen
# jointly per 128-column block, ...; see llava_sculpt/methods/tailor.py) is what produced the paper's numbers.
# That release also tailors only decoder layers 20-31 (--tailor_first_layer 20); whether LoRASculpt's authors
# kept that for their all-layer LoRA runs is not stated, so every layer is tailored here (add the flag to
# TRAIN_ARGS to follow the release there too).
# Paths (MODEL_BASE, DATA_ROOT, RUNS_DIR, PYTHON) are relative to the folder you run the script from; the
# inputs are checked before anything is created.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_paths.sh"
project_python "$(dirname "$HERE")"
resolve_paths MODEL_BASE DATA_ROOT RUNS_DIR CORDA_DATA CORDA_IMAGE_FOLDER
check_launch
[ -z "${NNODES:-}" ] || script_error "NNODES=$NNODES: reproduce_table1.sh trains and evaluates in turn from one node;" \
  "set HOSTFILE instead (DeepSpeed's launcher starts the other nodes for each training run), or launch" \
  "finetune.sh with NNODES on every node yourself"
need_model MODEL_BASE "a local Hugging Face LLaVA-1.5 checkpoint"
need_dir DATA_ROOT "the folder holding the \`llava-sculpt prepare\` outputs of the six benchmarks"
RUNS_DIR=${RUNS_DIR:-$(dirname "$HERE")/playground/table1}
need_output_dir RUNS_DIR
METHODS=${METHODS:-"lora dora l2 orth tailor dare intruders asymlora magnitude_mask spider lora-gaussian lora-pissa lora-olora lora-eva${CORDA_DATA:+ lora-corda} sculpt"}
case " $METHODS " in
  *" lora-corda "*) need_file CORDA_DATA "a LLaVA training JSON of SOURCE-task samples (lora-corda's covariance data)" ;;
esac
first_rank=${RANKS:-16}; first_rank=${first_rank%% *}
RANKS=${RANKS:-"16 32 64"}
TARGETS=${TARGETS:-"iconqa coco"}
for dataset in ${BENCHMARKS:-okvqa ocrvqa gqa textvqa iconqa coco} $TARGETS; do
  [ -f "$DATA_ROOT/$dataset/manifest.json" ] || script_error "DATA_ROOT=$DATA_ROOT has no $dataset/manifest.json:" \
    "run \`llava-sculpt prepare $dataset --out-dir $DATA_ROOT/$dataset ...\`"
done
for target in $TARGETS; do
  [ -f "$DATA_ROOT/$target/train.json" ] || script_error "DATA_ROOT=$DATA_ROOT has no $target/train.json (the" \
    "training data of target $target): run \`llava-sculpt prepare $target --out-dir $DATA_ROOT/$target ...\`"
done
case " ${BENCHMARKS:-okvqa ocrvqa gqa textvqa iconqa coco} $TARGETS " in
  *" coco "*)  # COCO must be a Karpathy split (manifest.json's karpathy / coco_split), unless ALLOW_NON_KARPATHY=1
    coco_rc=0
    coco_split=$("$PYTHON" -m llava_sculpt.data.prepare.coco "$DATA_ROOT/coco/manifest.json") || coco_rc=$?
    if [ "$coco_rc" = 3 ] && [ "${ALLOW_NON_KARPATHY:-0}" = 1 ]; then
      echo "warning: $coco_split (ALLOW_NON_KARPATHY=1: used anyway; its CIDEr is not the paper's)" >&2
    elif [ "$coco_rc" = 3 ]; then
      script_error "$coco_split. Prepare the Karpathy split (\`llava-sculpt prepare coco --raw-dir\` on" \
        "dataset_coco.json, or --hf-dataset yerevann/coco-karpathy), or set ALLOW_NON_KARPATHY=1 to use it anyway"
    elif [ "$coco_rc" != 0 ]; then
      script_error "cannot check which COCO split $DATA_ROOT/coco/manifest.json is: ${coco_split:-$PYTHON failed}"
    fi ;;
esac
read -r -a train_args <<< "${TRAIN_ARGS:-}"

if [ "${DRY_RUN:-0}" = 0 ]; then
  echo "== zero-shot" >&2
  EVAL_DIR="$RUNS_DIR/zero-shot" bash "$HERE/eval_zero_shot.sh" "$MODEL_BASE"
fi
for target in $TARGETS; do
  manifest="$DATA_ROOT/$target/manifest.json"
  [ -f "$manifest" ] || { echo "error: $manifest not found: run \`llava-sculpt prepare $target --out-dir $DATA_ROOT/$target ...\`" >&2; exit 2; }
  image_folder=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['image_folder'])" "$manifest")
  for rank in $RANKS; do
    for method in $METHODS; do
      run="$RUNS_DIR/$target/${method}_r${rank}"
      case $method in
        magnitude_mask|spider)  # no LoRA, no rank: once per target, in the first rank's group
          [ "$rank" = "$first_rank" ] || continue
          run="$RUNS_DIR/$target/${method}" ;;
      esac
      echo "== $target / $method / rank $rank -> $run" >&2
      method_args=()
      case $method in tailor) method_args=(--tailor_compat official) ;; esac  # the paper's numbers: see above
      if [ ! -f "$run/training_complete.json" ]; then  # finetune.sh maps lora-INIT (and CORDA_DATA) to flags
        METHOD=$method TARGET=$target LORA_R=$rank MODEL_BASE=$MODEL_BASE DATA_PATH="$DATA_ROOT/$target/train.json" \
          IMAGE_FOLDER=$image_folder OUTPUT_DIR=$run bash "$HERE/finetune.sh" ${method_args[@]+"${method_args[@]}"} "${train_args[@]}"
      fi
      [ "${DRY_RUN:-0}" = 0 ] || continue  # DRY_RUN=1: finetune.sh printed the command; nothing else runs
      model=$run
      case $method in dare|tailor|intruders) model=$run/merged ;; esac
      if [ "$model" = "$run/merged" ] && [ ! -f "$model/config.json" ]; then
        # the run finished but its transform did not (e.g. stopped or out of memory): redo only the transform
        "$PYTHON" -m llava_sculpt.cli transform "$method" --model-path "$run" --model-base "$MODEL_BASE" \
          --output-dir "$model" ${method_args[@]+"${method_args[@]}"}
      fi
      METHOD=$method LORA_R=$rank EVAL_DIR="$run/eval" MODEL_BASE=$MODEL_BASE \
        bash "$HERE/eval_source_target.sh" "$model" "$target" > /dev/null
    done
  done
  [ "${DRY_RUN:-0}" = 0 ] || continue
  "$PYTHON" -m llava_sculpt.cli table "$RUNS_DIR/zero-shot/" "$RUNS_DIR/$target"/*/eval \
    --format md,csv --out "$RUNS_DIR/table1_$target"
done
[ "${DRY_RUN:-0}" = 1 ] || echo "tables: $RUNS_DIR/table1_*.md / .csv" >&2
