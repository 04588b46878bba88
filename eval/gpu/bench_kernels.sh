#!/usr/bin/env bash
# One device call: eval/bench_kernels.py (copy bandwidth; our decode attention, entry-list
# build and write_packed against SGLang's bf16 / fp8 Triton decode; Qwen2.5-7B heads, every
# shipped config) -> $OUT/bench_kernels.{json,md}. Extra arguments go to the script
# (e.g. --grids 1x32768 16x32768, --splits 2,8,32, --dot-precision fp16).
#   run(command="bash eval/gpu/bench_kernels.sh", carry=[".gpu-rig"])
set -u
source eval/gpu/setup.sh || exit 1
python3 eval/bench_kernels.py --out "$OUT" "$@"
