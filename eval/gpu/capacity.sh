#!/usr/bin/env bash
# One device call: stock bf16 and each shipped config, 8K and 32K prompts (32704 + 32 new
# tokens fit the 32768 context), JSON to $OUT.
#   run(command="bash eval/gpu/capacity.sh [CONFIG...]", carry=[".gpu-rig"])
set -u
source eval/gpu/setup.sh || exit 1
CONFIGS=("$@")
[ ${#CONFIGS[@]} -eq 0 ] && CONFIGS=(bf16 configs/qwen_8x.yaml configs/qwen_8x_aggressive.yaml configs/qwen_12x.yaml)
python3 eval/server_capacity.py --model-path .gpu-rig/qwen2.5-7b-dummy --configs "${CONFIGS[@]}" \
  --prompt-lens ${PROMPT_LENS:-8192 32704} --max-new-tokens ${MAX_NEW:-32} \
  --out "$OUT/capacity.json" --log-dir "$OUT"
