#!/usr/bin/env bash
# l2 on iconqa at the paper's Table 1 settings; rank from LORA_R (16, 32 or 64; default 32). See finetune.sh;
# METHOD or TARGET set to anything else in the environment is an error (use finetune.sh for those).
source "$(dirname "$0")/_paths.sh"
wrapper_fixes l2 iconqa
METHOD=l2 TARGET=iconqa exec bash "$(dirname "$0")/finetune.sh" "$@"
