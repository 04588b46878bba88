#!/usr/bin/env bash
# One device call: the bundled tiny model on SGLang servers (stock bf16, then each config; one
# config again on the torch reference path, SGLANG_KVC_TRITON=0) -> $OUT/serve/serve_eval.{json,md}, and, at the
# same time on the same GPU, the transformers reference path on the same samples ->
# $OUT/hf/quality.{json,md} (quality only: nothing here is timed against anything else).
# Samples: held-out seed 1 (the tuned configs were chosen on seed 0).
#   run(command="bash eval/gpu/quality.sh", carry=[".gpu-rig"])
set -u
source eval/gpu/setup.sh || exit 1
CONFIGS=("$@")
[ ${#CONFIGS[@]} -eq 0 ] && CONFIGS=(bf16 configs/qwen_8x_tuned.yaml configs/qwen_5x_tuned.yaml
  configs/qwen_12x_tuned.yaml "qwen_8x_tuned+torch:configs/qwen_8x_tuned.yaml" configs/qwen_8x.yaml
  configs/qwen_8x_aggressive.yaml configs/qwen_12x.yaml)
YAMLS=(); for c in "${CONFIGS[@]}"; do case "$c" in *:*|bf16) ;; *) YAMLS+=("$c");; esac; done
python3 -m eval.tiny.quality --device cuda --configs "${YAMLS[@]}" --samples 25 --seed 1 --out "$OUT/hf" \
  > /tmp/hf-quality.log 2>&1 &
HF=$!
python3 eval/tiny/serve_eval.py --configs "${CONFIGS[@]}" --samples 25 --seed 1 --out "$OUT/serve" \
  --log-dir /tmp/serve-logs --deadline-s "${DEADLINE_S:-470}" 2>&1 | grep -v "it/s"
wait $HF; echo "transformers path exit $?"; grep -v "it/s" /tmp/hf-quality.log | tail -20
