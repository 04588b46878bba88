#!/usr/bin/env bash
# One device call: SGLang servers on dummy Qwen2.5-7B, one after another, with the Triton
# path and SGLang's decode CUDA graphs on (the default; SGLANG_KVC_TRITON=0 runs the torch
# path with graphs off); stock bf16 runs with the same graph settings. Measures:
# per prompt length the prefill time and decode ms/token, the decode throughput of a batch,
# and greedy token / log-probability agreement with stock (eval/server_capacity.py);
# PROFILE_STEPS=24 adds a profiled batch round per server (SGLang's torch profiler,
# summarized per step: eval/trace_summary.py); PROFILE_REPEAT_STEPS=S instead profiles the
# repeated prompt once more (its prefill step and S decode steps); REPEATS=N sends the last
# prompt again N times (streamed: time to first token, decode ms/token).
# OVERLAP=0 runs every server with --disable-overlap-schedule (default: SGLang's overlap
# scheduler on for all); FIDELITY_AT_ONCE=1 sends the fidelity prompts all at once;
# CONCURRENT=N ends each server with N requests at once and a health / leak check.
# ARRIVALS="COUNT RATE PROMPT_LEN NEW_TOKENS": requests arriving spread out (Poisson), so
# that they join and finish while others decode. IDENTICAL="COUNT PROMPT_LEN": copies of one
# prompt at once (PROMPT_LEN below the chunked-prefill size: one copy's chunk is swapped for
# another's cached tokens in the radix cache).
# JSON and each server's log to $OUT (profiles' traces packed in $OUT/traces.tgz).
#   run(command="bash eval/gpu/serving.sh [CONFIG...]", carry=[".gpu-rig"])
set -u
source eval/gpu/setup.sh || exit 1
CONFIGS=("$@")
[ ${#CONFIGS[@]} -eq 0 ] && CONFIGS=(bf16 eval/configs/retain_all_8bit.yaml configs/qwen_8x_tuned.yaml configs/qwen_8x_aggressive.yaml configs/qwen_8x.yaml)
# BATCH_DECODE: one or more "BATCH PROMPT_LEN NEW_TOKENS" shapes, comma-separated (each server runs them all).
BATCH_ARGS=()
IFS=',' read -ra BATCH_SHAPES <<< "${BATCH_DECODE:-16 4096 128}"
for shape in "${BATCH_SHAPES[@]}"; do BATCH_ARGS+=(--batch-decode $shape); done
# Stop before the device call's 600 s limit: server_capacity.py rewrites the JSON after
# every config, so what finished is kept.
timeout "${BUDGET_S:-560}" python3 eval/server_capacity.py --model-path .gpu-rig/qwen2.5-7b-dummy \
  --configs "${CONFIGS[@]}" --prompt-lens ${PROMPT_LENS:-8192 32448} --max-new-tokens "${MAX_NEW:-256}" \
  "${BATCH_ARGS[@]}" --batch-rounds "${BATCH_ROUNDS:-3}" --fidelity-samples "${FIDELITY:-8}" \
  --profile-decode-steps "${PROFILE_STEPS:-0}" --profile-repeat-steps "${PROFILE_REPEAT_STEPS:-0}" \
  --repeats "${REPEATS:-1}" --concurrent "${CONCURRENT:-0}" \
  $([ -n "${ARRIVALS:-}" ] && echo --arrivals $ARRIVALS) \
  $([ -n "${IDENTICAL:-}" ] && echo --identical $IDENTICAL) \
  $([ "${FIDELITY_AT_ONCE:-0}" = 1 ] && echo --fidelity-concurrent) \
  --out "$OUT/serving.json" --log-dir "$OUT" --server-args --cuda-graph-max-bs "${GRAPH_MAX_BS:-16}" \
  $([ "${OVERLAP:-1}" = 0 ] && echo --disable-overlap-schedule)
status=$?
# A call returns at most 8 files from $OUT (device README): the profiles' traces (two per server)
# travel as one archive (run 36 lost three traces to that limit).
if compgen -G "$OUT/profile-*" >/dev/null; then
  (cd "$OUT" && tar czf traces.tgz profile-* && rm -rf profile-*)
fi
exit $status
