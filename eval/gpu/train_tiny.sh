#!/usr/bin/env bash
# One device call: train the tiny quality-test model (eval/tiny/README.md) -> $OUT/model
# (config, bf16 safetensors, tokenizer, train_log.json) with the bundled model's recipe (v12:
# the training defaults plus step graphs). The image's torch / transformers / tokenizers
# suffice, so the rig is not installed. Extra arguments go to the training script and win
# (e.g. --init eval/tiny/model to continue from the committed folder).
#   run(command="bash eval/gpu/train_tiny.sh", timeout_s=600)
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m eval.tiny.train --out "$OUT/model" --device cuda --minutes "${MINUTES:-9.0}" --size deep --seed 0 \
  --lengths 1024 2048 4096 8192 --eval-samples 200 --target 0.95 --context-loss-weight 1.0 --step-graphs "$@"
