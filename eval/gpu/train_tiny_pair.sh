#!/usr/bin/env bash
# One device call on a two-GPU machine: two training runs of the tiny model side by side, one
# per GPU, each exactly `train_tiny.sh` (the same <= 10-minute budget on one H200) with its own
# extra arguments -> $OUT/a, $OUT/b: model.safetensors, config.json, train_log.json, log.txt.
# The tokenizer and generation config are rebuilt identically by every run (not copied back:
# the device tool returns at most 8 files).
#   run(command='bash eval/gpu/train_tiny_pair.sh "--size base" "--size deep"', kind="nvidia-h200-x2", timeout_s=600)
set -u
ARMS=("$1" "$2")
for i in 0 1; do
  name=$([ $i = 0 ] && echo a || echo b)
  mkdir -p "$OUT/$name" "/tmp/tiny-$name"
  # shellcheck disable=SC2086  # each arm's arguments are split on purpose
  CUDA_VISIBLE_DEVICES=$i OUT=/tmp/tiny-$name bash eval/gpu/train_tiny.sh --workers 14 ${ARMS[$i]} \
    > "$OUT/$name/log.txt" 2>&1 &
done
wait
for name in a b; do
  cp /tmp/tiny-$name/model/{model.safetensors,config.json,train_log.json} "$OUT/$name/" 2>/dev/null
  echo "== arm $name: ${ARMS[$([ $name = a ] && echo 0 || echo 1)]}"
  grep -v "it/s" "$OUT/$name/log.txt" | tail -12
done
