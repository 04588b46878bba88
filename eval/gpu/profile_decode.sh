#!/usr/bin/env bash
# One device call: Nsight Compute on one launch of the decode split kernel (the engine's, or --kernel) of
# eval/profile_decode.py (speed of light, occupancy, warp state, launch stats),
# -> $OUT/ncu-<label>.txt. Arguments after the label go to eval/profile_decode.py.
#   run(command="bash eval/gpu/profile_decode.sh tuned-h1 --config configs/qwen_8x_tuned.yaml", carry=[".gpu-rig"])
# With NCU_DETAILS=1, two more passes on the same launch, each allowed to fail on its own (both ran
# on the H200 on 2026-12-02, ncu/ncu-2026-12-02-b-*): the warp stall reasons per issued
# instruction (-> ncu-<label>-stalls.txt; the sections above print only their total) and the
# memory tables (shared-memory wavefronts, bank conflicts, sectors per request) with the source
# counters (excess global sectors of uncoalesced loads, sampled stall reasons), printed in full
# (-> ncu-<label>-memory.txt; without --print-details the tables print nothing).
set -u
label=$1; shift
source eval/gpu/setup.sh || exit 1
NCU=(ncu --clock-control none --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1)
"${NCU[@]}" --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
  --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats \
  python3 eval/profile_decode.py "$@" > "$OUT/ncu-$label.txt" 2>&1
status=$?
tail -n 120 "$OUT/ncu-$label.txt"
if [ "${NCU_DETAILS:-0}" = 1 ]; then
  "${NCU[@]}" --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    python3 eval/profile_decode.py "$@" > "$OUT/ncu-$label-stalls.txt" 2>&1 \
    || echo "stall pass failed: $OUT/ncu-$label-stalls.txt"
  "${NCU[@]}" --section MemoryWorkloadAnalysis_Tables --section SourceCounters --print-details all \
    python3 eval/profile_decode.py "$@" > "$OUT/ncu-$label-memory.txt" 2>&1 \
    || echo "memory-table pass failed: $OUT/ncu-$label-memory.txt"
fi
exit $status
