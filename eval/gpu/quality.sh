#!/usr/bin/env bash
# One device call: the bundled tiny model on SGLang servers (stock bf16, then each config; one
# config again with the Triton decode kernels) -> $OUT/serve/serve_eval.{json,md} + server logs,
# and the transformers reference path on the same samples -> $OUT/hf/quality.{json,md}
# (prediction-by-prediction cross-check of the two paths: eval/tiny/compare.py).
#   run(command="bash eval/gpu/quality.sh", carry=[".gpu-rig"])
set -u
source eval/gpu/setup.sh || exit 1
CONFIGS=("$@")
[ ${#CONFIGS[@]} -eq 0 ] && CONFIGS=(bf16 configs/*.yaml "qwen_8x+triton:configs/qwen_8x.yaml")
YAMLS=(); for c in "${CONFIGS[@]}"; do case "$c" in *:*|bf16) ;; *) YAMLS+=("$c");; esac; done
python3 -m eval.tiny.quality --device cuda --configs "${YAMLS[@]}" --samples 25 --out "$OUT/hf" 2>&1 | grep -v "it/s"
python3 eval/tiny/serve_eval.py --configs "${CONFIGS[@]}" --samples 25 --out "$OUT/serve" \
  --log-dir /tmp/serve-logs --deadline-s "${DEADLINE_S:-420}" 2>&1 | grep -v "it/s"
