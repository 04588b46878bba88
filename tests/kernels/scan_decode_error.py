"""The decode kernel's error against the torch reference over many seeds, in the interpreter:
the measurement behind TOLERANCE in test_decode_attention_kernel.py.

    python tests/kernels/scan_decode_error.py --seeds 0 240 --extra 904402330 --out FILE.json

The case is test_head_dim_not_a_power_of_two's (2-bit K, 3-bit V, 8-bit guard, head_dim 96,
default dot_precision "auto": fp16 operands on packed rows), for each split-kernel version;
the error is max |out - reference| / the pool's value scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import test_decode_attention_kernel as cases  # noqa: E402

VERSIONS = ("v1", "v2", "v2 without prefetch")


def error(seed: int, version: str) -> float:
    torch.manual_seed(seed)
    gen, device = torch.Generator().manual_seed(seed), torch.device("cpu")
    pool = cases.build_pool(gen, device, key_bits=2, value_bits=3, group_size=32, guard_bits=8, head_dim=96)
    batch = cases.build_batch([33, 1, 7], gen, device)
    q = cases.random_queries(3, 4, gen, device, head_dim=96)
    out = cases.run_kernel(pool, 1, q, *batch, 96**-0.5, version=version)
    expected = cases.reference_decode(pool, 1, q, *batch, 96**-0.5)
    return ((out - expected).abs().max() / pool.value_scale).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs=2, type=int, default=[0, 240], metavar=("FIRST", "END"))
    parser.add_argument("--extra", nargs="*", type=int, default=[], help="more seeds (e.g. one a CI run printed)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seeds = [*range(*args.seeds), *args.extra]
    errors = {version: {seed: error(seed, version) for seed in seeds} for version in VERSIONS}
    report = {
        "command": "python " + " ".join(sys.argv),
        "case": "test_head_dim_not_a_power_of_two (K2 V3 guard 8-bit, head_dim 96), dot_precision auto",
        "tolerance": cases.TOLERANCE,
        "worst": {version: max(by_seed.values()) for version, by_seed in errors.items()},
        "worst_seed": {version: max(by_seed, key=by_seed.get) for version, by_seed in errors.items()},
        "errors": errors,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("worst", "worst_seed", "tolerance")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
