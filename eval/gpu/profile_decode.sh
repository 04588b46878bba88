#!/usr/bin/env bash
# One device call: Nsight Compute on one launch of the decode split kernel (the engine's, or --kernel) of
# eval/profile_decode.py (speed of light, occupancy, warp stall reasons, launch stats),
# -> $OUT/ncu-<label>.txt. Arguments after the label go to eval/profile_decode.py.
#   run(command="bash eval/gpu/profile_decode.sh tuned-h1 --config configs/qwen_8x_tuned.yaml", carry=[".gpu-rig"])
set -u
label=$1; shift
source eval/gpu/setup.sh || exit 1
ncu --clock-control none --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
  --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats \
  python3 eval/profile_decode.py "$@" > "$OUT/ncu-$label.txt" 2>&1
status=$?
tail -n 120 "$OUT/ncu-$label.txt"
exit $status
