"""Host-side cost of the pool's bookkeeping: torch operators dispatched per operation.

    python -m eval.host_ops --out FILE.json [--config configs/qwen_8x_tuned.yaml]
                            [--requests 16] [--window-tokens 8]

Builds a CompressedKVPool on the CPU with Qwen2.5-7B's KV shape (28 layers, 4 KV heads,
head_dim 128) and times, under torch.profiler, what the server does around decode steps:
  * `stage`: staging rows for one decode step's new tokens (`--requests` of them);
  * `seal`: moving `requests x window-tokens` staged decode tokens to the low-bit tier in
    every layer (what `CompressedAttention` does every `decode_window / 2` steps);
  * `free`: returning those tokens' rows in every layer (a finished request, an eviction).
For each: the top-level torch operators dispatched, by name. On a GPU most of them are a
kernel launch and its host work (views such as `slice` and no-op `to` are not; the packed
writes are one Triton launch each instead of the torch quantizer's dozen operators). Host
times on this CPU are not reported: here the operators also do the quantization arithmetic,
which a GPU does not leave on the host. The GPU server's own figures come from
`eval/server_capacity.py --profile-decode-steps`; this is the part of them that runs anywhere.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from sglang_kvc.config import load_config
from sglang_kvc.planner import ModelShape, RuntimeLimits, plan_for
from sglang_kvc.pool import CompressedKVPool

QWEN25_7B_KV = ModelShape(num_layers=28, kv_heads=4, head_dim=128, context_len=32768)


class _Layer:
    def __init__(self, layer_id: int):
        self.layer_id = layer_id


def build_pool(config_path: Path, logical_tokens: int) -> CompressedKVPool:
    plan = plan_for(load_config(config_path), QWEN25_7B_KV, RuntimeLimits(chunked_prefill_size=2048,
                                                                           max_running_requests=64))
    shape = QWEN25_7B_KV
    return CompressedKVPool(logical_tokens, 1, torch.bfloat16, shape.kv_heads, shape.head_dim, shape.num_layers,
                            "cpu", plan=plan, sizes=plan.sizes_for_tokens(logical_tokens))


def staged_tokens(pool: CompressedKVPool, first: int, count: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.arange(first, first + count, dtype=torch.int64)
    pool.stage(tokens)
    for layer in range(pool.layer_num):
        k, v = (torch.randn(count, pool.head_num, pool.head_dim, generator=generator) for _ in range(2))
        pool.set_kv_buffer(_Layer(layer), tokens, k, v)
    return tokens


def top_level_operators(run) -> Counter:
    """The torch operators `run()` dispatched that no other operator called, by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return Counter(event.name for event in profiler.events()
                   if event.name.startswith("aten::")
                   and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def measure(config_path: Path, requests: int, window_tokens: int, logical_tokens: int = 65536) -> dict:
    """One stage, seal and free on a pool that has served a first round (so free lists
    have been popped and pushed before)."""
    generator = torch.Generator().manual_seed(0)
    pool = build_pool(config_path, logical_tokens)
    counts: dict[str, Counter] = {}
    next_token = 1
    for _ in range(2):
        sealed = staged_tokens(pool, next_token, requests * window_tokens, generator)
        next_token += sealed.numel()
        step = torch.arange(next_token, next_token + requests, dtype=torch.int64)
        next_token += requests
        counts["stage"] = top_level_operators(lambda: pool.stage(step))
        counts["seal"] = top_level_operators(lambda: pool.seal(sealed))
        counts["free"] = top_level_operators(lambda: pool.free_tokens(torch.cat((sealed, step))))
    pool.check_invariants(full=True)
    return {name: {"operators": sum(c.values()), "most_dispatched": dict(c.most_common(8))}
            for name, c in counts.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/qwen_8x_tuned.yaml"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--window-tokens", type=int, default=8, help="decode tokens per request per seal")
    args = parser.parse_args(argv)
    report = {"config": str(args.config), "requests": args.requests, "window_tokens": args.window_tokens,
              "torch": torch.__version__, **measure(args.config, args.requests, args.window_tokens)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
