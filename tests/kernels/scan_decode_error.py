"""The decode kernel's error against the torch reference over many seeds, in the interpreter:
the measurement behind TOLERANCE in test_decode_attention_kernel.py.

    python tests/kernels/scan_decode_error.py --seeds 0 240 --extra 904402330 --out FILE.json
        [--case head_dim_96 | bits4_g32 | bf16_dots]

Cases: `head_dim_96`, test_head_dim_not_a_power_of_two's (2-bit K, 3-bit V, 8-bit guard,
head_dim 96); `bits4_g32`, test_bit_widths_and_group_sizes's 4-bit K and V in groups of 32
(where v3's register-operand loop runs); both at dot_precision "auto" (fp16 operands on
packed rows). `bf16_dots`, test_bf16_dot_operands's (4-bit K, 2-bit V in groups of 64, bf16
staging and guard, 7 query heads per KV head, dot_precision "bf16"). Each split-kernel
version; the error is max |out - reference| / the pool's value scale.
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

VERSIONS = ("v1", "v2", "v2 without prefetch", "v3", "v4", "v5")
# name: (description, build_pool arguments, sequence lengths, layer, query group, dot_precision)
CASES = {
    "head_dim_96": ("test_head_dim_not_a_power_of_two (K2 V3 guard 8-bit, head_dim 96), dot_precision auto",
                    {"key_bits": 2, "value_bits": 3, "group_size": 32, "guard_bits": 8, "head_dim": 96}, [33, 1, 7],
                    1, 4, "auto"),
    "bits4_g32": ("test_bit_widths_and_group_sizes (K4 V4, groups of 32, head_dim 64), dot_precision auto",
                  {"key_bits": 4, "value_bits": 4, "group_size": 32}, [1, 7, 33, 0], 1, 4, "auto"),
    "bf16_dots": ("test_bf16_dot_operands (K4 V2, groups of 64, bf16 guard, GQA 7), dot_precision bf16",
                  {"key_bits": 4, "value_bits": 2, "group_size": 64}, [33, 7, 1], 0, 7, "bf16"),
}


def error(seed: int, version: str, case: str = "head_dim_96") -> float:
    _, pool_args, seq_lens, layer, query_group, dot_precision = CASES[case]
    head_dim = pool_args.get("head_dim", cases.HEAD_DIM)
    torch.manual_seed(seed)
    gen, device = torch.Generator().manual_seed(seed), torch.device("cpu")
    pool = cases.build_pool(gen, device, **pool_args)
    batch = cases.build_batch(seq_lens, gen, device)
    q = cases.random_queries(len(seq_lens), query_group, gen, device, head_dim=head_dim)
    out = cases.run_kernel(pool, layer, q, *batch, head_dim**-0.5, version=version, dot_precision=dot_precision)
    expected = cases.reference_decode(pool, layer, q, *batch, head_dim**-0.5)
    return ((out - expected).abs().max() / pool.value_scale).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs=2, type=int, default=[0, 240], metavar=("FIRST", "END"))
    parser.add_argument("--extra", nargs="*", type=int, default=[], help="more seeds (e.g. one a CI run printed)")
    parser.add_argument("--case", choices=sorted(CASES), default="head_dim_96")
    parser.add_argument("--versions", nargs="+", choices=VERSIONS, default=list(VERSIONS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seeds = [*range(*args.seeds), *args.extra]
    errors = {version: {seed: error(seed, version, args.case) for seed in seeds} for version in args.versions}
    report = {
        "command": "python " + " ".join(sys.argv),
        "case": CASES[args.case][0],
        "tolerance": cases.TOLERANCE_BF16 if CASES[args.case][5] == "bf16" else cases.TOLERANCE,
        "worst": {version: max(by_seed.values()) for version, by_seed in errors.items()},
        "worst_seed": {version: max(by_seed, key=by_seed.get) for version, by_seed in errors.items()},
        "errors": errors,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("worst", "worst_seed", "tolerance")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
