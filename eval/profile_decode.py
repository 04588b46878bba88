"""One decode-attention cell of eval/bench_kernels.py, run a few times for a profiler.

    ncu --clock-control none --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python3 eval/profile_decode.py --config configs/qwen_8x_tuned.yaml --grid 48x32768

Builds the same layer as the benchmark (Qwen2.5-7B heads, the config's middle-layer budget,
random rows) and calls `decode_attention` with the engine's kernel for the config
(engine.decode_kernel) or `--kernel` (engine.DecodeKernel.FORM, e.g. v5:64:r168:pairs), `--repeat` times,
so that the profiler can skip the compiling first launches. Prints the time per call (CUDA
events, for orientation: the benchmark is what reports times).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# The repository root after the installed package (the device installs sglang_kvc into a
# target folder on PYTHONPATH; the root's sglang_kvc/ lacks the kernels mapping).
sys.path.append(str(Path(__file__).resolve().parents[1]))

from eval.bench_kernels import QWEN25_7B, Batch, build_layer, parse_grid  # noqa: E402
from sglang_kvc.config import load_config  # noqa: E402
from sglang_kvc.engine import DecodeKernel, decode_kernel, decode_num_splits  # noqa: E402
from sglang_kvc.kernels.decode_attention import decode_attention, decode_entries, layer_tables  # noqa: E402
from sglang_kvc.planner import plan_for  # noqa: E402


def kernel_argument(text: str) -> DecodeKernel:
    try:
        return DecodeKernel.parse(text)
    except ValueError as error:  # argparse shows an ArgumentTypeError's message, not a ValueError's
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--grid", type=parse_grid, default=(48, 32768), help="BxTOKENS")
    parser.add_argument("--kernel", type=kernel_argument,
                        help=f"{DecodeKernel.FORM}, e.g. v5:64:r168:pairs (default: the engine's for the config)")
    parser.add_argument("--splits", type=int, help="default: engine.decode_num_splits")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device("cuda")
    torch.manual_seed(0)
    shape = QWEN25_7B
    plan = plan_for(load_config(args.config), shape.model_shape())
    batch_size, tokens = args.grid
    batch = Batch.random(batch_size, tokens, shape, device)
    layer = build_layer(plan, shape.num_layers // 2, batch)
    entries = decode_entries(layer.location[0], batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                             max_seq_len=tokens, max_entries=batch_size * tokens)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    splits = args.splits or decode_num_splits(batch_size, shape.kv_heads, tokens, sm_count)
    kernel = args.kernel or decode_kernel(plan.key_format, plan.value_format)
    out = torch.empty(batch.q.shape, dtype=torch.float32, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(args.repeat):
        start.record()
        decode_attention(batch.q, entries.indptr, entries.tier, entries.row, *layer_tables(layer, 0),
                         shape.head_dim**-0.5, splits, tier_indptr=entries.tier_indptr, out=out,
                         **kernel.arguments())
        end.record()
        torch.cuda.synchronize()
    print(f"{plan.config.name} {batch_size}x{tokens} ({kernel.name}): held {layer.held_per_request} per request, "
          f"{splits} splits: {start.elapsed_time(end):.3f} ms (last call, with launch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
