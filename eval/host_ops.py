"""Host-side cost of the pool's bookkeeping: torch operators dispatched per operation.

    python -m eval.host_ops --out FILE.json [--config configs/qwen_8x_tuned.yaml]
                            [--requests 16] [--window-tokens 8]

Builds a CompressedKVPool on the CPU with Qwen2.5-7B's KV shape (28 layers, 4 KV heads,
head_dim 128) and times, under torch.profiler, what the server does around decode steps:
  * `stage`: staging rows for one decode step's new tokens (`--requests` of them);
  * `seal`: moving `requests x window-tokens` staged decode tokens to the low-bit tier in
    every layer, finding them in the staging map (`pool.seal`: a finished request's tokens,
    and the decode window's fallback); `seal_known`: the same for tokens the caller knows
    to be staged (`pool.seal_staged`: the decode window every `decode_window / 2` steps);
  * `seal_released`: the release seal of `--requests` finished requests with
    `window-tokens` staged decode tokens each, from the decode window's per-slot
    bookkeeping (`DecodeWindow.seal_released`, one call per request; before, and still for
    a request the window does not know, `pool.seal` on each request's tokens);
    `seal_released_together`: the same requests finishing in one step, released in one free
    group (one `seal_staged` for all at the group's end);
  * `free`: returning those tokens' rows in every layer (a finished request, an eviction);
  * `compress_pass`: a prefill pass's compression when it finishes `--prefill-requests`
    prompts of `--prompt-len` tokens (`CompressedAttention.compress_layer` after every
    layer's attention: keep the scoring queries; after the last, score, select and place in
    every layer at once), for each prompt count from 1 up to that
    (`compress_pass_by_prompts`, also per layer). On the CPU the scores
    come from the torch scorer (and, counted separately, from the server's Triton scorer in
    Triton's interpreter) and the packed writes from the torch quantizer; on a GPU each is a
    few Triton launches.
For each: the top-level torch operators dispatched, by name, and (the decode-step operations) the
operators at any depth whose output size or value a GPU would have to read back first
(`device_syncs`: boolean selection, `nonzero`, `unique`, `item`, `tolist`). On a GPU most of them are a
kernel launch and its host work (views such as `slice` and no-op `to` are not; the packed
writes are one Triton launch each instead of the torch quantizer's dozen operators). Host
times on this CPU are not reported: here the operators also do the quantization arithmetic,
which a GPU does not leave on the host. The GPU server's own figures come from
`eval/server_capacity.py --profile-decode-steps`; this is the part of them that runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The Triton scorer runs in the interpreter here, which must be chosen before Triton is
    # imported (SGLang imports it with the pool below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sglang_kvc.config import load_config  # noqa: E402
from sglang_kvc.decode_window import DecodeWindow  # noqa: E402
from sglang_kvc.engine import BatchInfo, CompressedAttention  # noqa: E402
from sglang_kvc.planner import ModelShape, RuntimeLimits, plan_for  # noqa: E402
from sglang_kvc.policy import scorer_from_config  # noqa: E402
from sglang_kvc.pool import CompressedKVPool  # noqa: E402

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


# Operators that make a view of their input (no kernel on a GPU, a little host work).
VIEW_OPERATORS = frozenset({
    "aten::slice", "aten::select", "aten::view", "aten::reshape", "aten::unsqueeze", "aten::squeeze",
    "aten::permute", "aten::detach", "aten::detach_", "aten::expand", "aten::as_strided", "aten::transpose",
    "aten::t", "aten::split", "aten::split_with_sizes", "aten::alias", "aten::lift_fresh", "aten::flatten",
})


# Operators that wait for the device on CUDA: their output's size or value is read back.
SYNCING_OPERATORS = frozenset({"aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                               "aten::_local_scalar_dense", "aten::item"})


def launching(counts: Counter) -> int:
    """How many of `counts` are not views: on a GPU, about one kernel launch each (a no-op
    `to` counted among them)."""
    return sum(count for name, count in counts.items() if name not in VIEW_OPERATORS)


def top_level_operators(run, outside: str | None = None) -> Counter:
    """The torch operators `run()` dispatched that no other operator called, by name;
    `outside`: only those not within a `record_function` range of that name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return _top_level(profiler.events(), outside)


def _top_level(events, outside: str | None = None) -> Counter:
    return Counter(event.name for event in events
                   if event.name.startswith("aten::")
                   and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
                   and (outside is None or not _within(event, outside)))


def _within(event, range_name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == range_name:
            return True
        parent = parent.cpu_parent
    return False


def measure(config_path: Path, requests: int, window_tokens: int, logical_tokens: int = 65536) -> dict:
    """One stage, seal and free on a pool that has served a first round (so free lists
    have been popped and pushed before)."""
    generator = torch.Generator().manual_seed(0)
    pool = build_pool(config_path, logical_tokens)
    counts: dict[str, Counter] = {}
    syncs: dict[str, int] = {}
    next_token = 1
    for _ in range(2):
        sealed = staged_tokens(pool, next_token, requests * window_tokens, generator)
        next_token += sealed.numel()
        known = staged_tokens(pool, next_token, requests * window_tokens, generator)
        next_token += known.numel()
        released = staged_tokens(pool, next_token, requests * window_tokens, generator)
        next_token += released.numel()
        window = released_requests(pool, released.view(requests, window_tokens))
        released_together = staged_tokens(pool, next_token, requests * window_tokens, generator)
        next_token += released_together.numel()
        window_together = released_requests(pool, released_together.view(requests, window_tokens))
        step = torch.arange(next_token, next_token + requests, dtype=torch.int64)
        next_token += requests
        operations = {
            "stage": lambda: pool.stage(step),
            "seal": lambda: pool.seal(sealed),
            "seal_known": lambda: pool.seal_staged(known),
            "seal_released": lambda: [window.seal_released(slot, window_tokens) for slot in range(1, requests + 1)],
            "seal_released_together": lambda: release_together(window_together, requests, window_tokens),
            "free": lambda: pool.free_tokens(torch.cat((sealed, known, released, released_together, step))),
        }
        for name, run in operations.items():
            counts[name], syncs[name] = operators_and_syncs(run)
    pool.check_invariants(full=True)
    return {name: {"operators": sum(c.values()), "not_views": launching(c), "device_syncs": syncs[name],
                   "most_dispatched": dict(c.most_common(8))}
            for name, c in counts.items()}


def release_together(window: DecodeWindow, requests: int, window_tokens: int) -> None:
    """The requests finishing in one decode step, released inside SGLang's free group (the
    allocator's `free_group_begin` / `free_group_end` open and close the window's group)."""
    window.begin_release_group()
    for slot in range(1, requests + 1):
        window.seal_released(slot, window_tokens)
    window.end_release_group()


def released_requests(pool: CompressedKVPool, tokens_per_request: torch.Tensor) -> DecodeWindow:
    """A decode window over request slots 1..n whose rows of `req_to_token` hold
    `tokens_per_request` (staged decode tokens from position 0), as it stands when those
    requests finish."""
    requests, tokens = tokens_per_request.shape
    req_to_token = torch.zeros((requests + 1, tokens), dtype=torch.int32)
    req_to_token[1:] = tokens_per_request
    window = DecodeWindow(pool, req_to_token, pool.config.quantization.decode_window)
    for slot in range(1, requests + 1):
        window.prompt_done(slot, 0)
    return window


def operators_and_syncs(run) -> tuple[Counter, int]:
    """`run()` once under the profiler: its top-level operators (`top_level_operators`) and
    how many calls would sync a GPU: SYNCING_OPERATORS at any depth, and `Tensor.tolist`
    (on a CPU tensor not an operator, so counted by wrapping it)."""
    tolist_calls = 0
    original_tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        nonlocal tolist_calls
        tolist_calls += 1
        return original_tolist(tensor)

    torch.Tensor.tolist = counted_tolist
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            run()
    finally:
        torch.Tensor.tolist = original_tolist
    events = profiler.events()
    return _top_level(events), tolist_calls + sum(1 for event in events if event.name in SYNCING_OPERATORS)


def measure_compress_pass(config_path: Path, prompts: int, prompt_len: int, q_heads: int = 28,
                          outside: str | None = None, scorer: str = "torch") -> Counter:
    """Operators of a prefill pass's compression finishing `prompts` fresh prompts:
    `compress_layer` in every layer (each keeps its scoring queries; after the last one the
    pass's prompts are scored, selected and placed in every layer at once). `outside=
    "kvc.score"` leaves out the scorer's. `scorer="triton"` scores with the window-score
    kernels (on the CPU in Triton's interpreter, whose own tensor bookkeeping then counts
    among the operators: compare counts across prompt counts, not with the torch scorer's)."""
    return top_level_operators(compress_pass(config_path, prompts, prompt_len, q_heads, scorer), outside=outside)


def compress_pass_syncs(config_path: Path, prompts: int, prompt_len: int, q_heads: int = 28) -> int:
    """How many calls of that pass (torch scorer) would sync a GPU (`operators_and_syncs`)."""
    return operators_and_syncs(compress_pass(config_path, prompts, prompt_len, q_heads))[1]


def compress_pass(config_path: Path, prompts: int, prompt_len: int, q_heads: int = 28, scorer: str = "torch"):
    """A pool holding `prompts` fresh staged prompts and their K/V, and the pass's compression
    (`compress_layer` in every layer) as a callable, ready to run once."""
    generator = torch.Generator().manual_seed(0)
    # Room in every layer's tiers (as in a server's pool of millions of rows): the one-write placing.
    pool = build_pool(config_path, logical_tokens=2 * prompts * prompt_len + 64)
    tokens = torch.arange(1, 1 + prompts * prompt_len, dtype=torch.int64).view(prompts, prompt_len)
    # The scorer the server uses ("triton": the window-score kernels, in the interpreter on the CPU).
    engine = CompressedAttention(pool, tokens.to(torch.int32), attention_impl="torch",
                                 scorer=scorer_from_config(pool.config, implementation=scorer))
    engine.begin(BatchInfo(is_decode=False, req_pool_indices=list(range(prompts)), seq_lens=[prompt_len] * prompts,
                           prefix_lens=[0] * prompts, extend_lens=[prompt_len] * prompts, last_chunk=[True] * prompts,
                           rids=[f"prompt-{i}" for i in range(prompts)]),
                 new_tokens=tokens.flatten())
    for layer in range(pool.layer_num):
        k, v = (torch.randn(prompts * prompt_len, pool.head_num, pool.head_dim, generator=generator) for _ in range(2))
        pool.set_kv_buffer(_Layer(layer), tokens.flatten(), k, v)
    queries = torch.randn(prompts * prompt_len, q_heads, pool.head_dim, generator=generator)

    def every_layer() -> None:
        for layer in range(pool.layer_num):
            engine.compress_layer(layer, queries)

    return every_layer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/qwen_8x_tuned.yaml"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--window-tokens", type=int, default=8, help="decode tokens per request per seal")
    parser.add_argument("--prefill-requests", type=int, default=16, help="prompts finishing in one prefill pass")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--no-triton-scorer", action="store_true",
                        help="skip the counts with the Triton scorer (Triton's interpreter: minutes per prompt count)")
    args = parser.parse_args(argv)
    report = {"config": str(args.config), "requests": args.requests, "window_tokens": args.window_tokens,
              "torch": torch.__version__, **measure(args.config, args.requests, args.window_tokens)}
    prompt_counts = sorted({1, 2, 4, args.prefill_requests})
    layers = build_pool(args.config, 64).layer_num

    def per_layer(counts: Counter) -> float:  # a pass's operators per layer (the pass compresses every layer)
        return round(launching(counts) / layers, 1)

    by_prompts = {prompts: measure_compress_pass(args.config, prompts, args.prompt_len) for prompts in prompt_counts}
    largest = by_prompts[args.prefill_requests]
    report["compress_pass"] = {"prompts": args.prefill_requests, "prompt_len": args.prompt_len, "layers": layers,
                               "operators": sum(largest.values()), "not_views": launching(largest),
                               "most_dispatched": dict(largest.most_common(8))}
    report["compress_pass_by_prompts"] = {}
    for prompts, counts in by_prompts.items():
        outside = measure_compress_pass(args.config, prompts, args.prompt_len, outside="kvc.score")
        row = {"not_views": launching(counts), "not_views_per_layer": per_layer(counts),
               "not_views_outside_scoring": launching(outside), "not_views_per_layer_outside_scoring": per_layer(outside),
               "device_syncs": compress_pass_syncs(args.config, prompts, args.prompt_len)}
        if not args.no_triton_scorer:
            triton_counts = measure_compress_pass(args.config, prompts, args.prompt_len, scorer="triton")
            row.update(not_views_with_the_triton_scorer=launching(triton_counts),
                       not_views_per_layer_with_the_triton_scorer=per_layer(triton_counts))
        report["compress_pass_by_prompts"][str(prompts)] = row
        print(prompts, row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
