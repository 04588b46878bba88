#!/usr/bin/env bash
# Device side, sourced from the repository root at the start of every `run` call:
# installs SGLang 0.5.17 from the carried rig (.gpu-rig, see ../shared/gpu/README.md)
# and this package from source (no dependencies) into /tmp/kvc, and exports PYTHONPATH.
#   source eval/gpu/setup.sh || exit 1
# Size: the rig's wheels (~52 MiB) plus the tracked tree (~15 MiB since the 6-layer tiny model)
# exceed the 64 MiB a call carries. Calls from 2026-11-29 12:40 on moved docs/ and tests/ out of
# the working tree for the call's duration (`mv docs tests /tmp/hold/`, back afterwards);
# nothing on the device reads them.
source .gpu-rig/install.sh .gpu-rig/wheels || return 1
rm -rf /tmp/kvc
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/kvc . 2>&1 \
  | grep -v -e "Target directory" -e "WARNING: Running pip as" >&2
export PYTHONPATH="/tmp/kvc:$PYTHONPATH" PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import sglang_kvc.plugin, sglang_kvc.kernels, sglang_kvc.patches") || return 1
