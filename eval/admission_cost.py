"""Host time of the row-aware admission check against the size of the radix cache.

    python -m eval.admission_cost --out FILE.json [--nodes 1000 10000 50000] [--tokens-per-node 8]

`patches.scheduler.admission_in_rows` runs after SGLang builds a PrefillAdder (every
scheduling step that admits prompts). When the pool's row headroom is below the logical
tokens the adder may count on (the usual case for a compressed plan once anything is
cached), it needs the rows, per layer, that evicting every unlocked radix node would free.
Until 2026-11-30 it walked the tree for them (O(cached nodes)); now it reads the
allocator's `evictable_rows` counter, kept current by the radix cache hooks. This builds
real SGLang objects on the CPU (RadixCache with those hooks, ReqToTokenPool, the compressed
allocator and pool with Qwen2.5-7B's 28 layers; one KV head of 128 dims, since neither
depends on the head shape), inserts `--nodes` cached prompts of `--tokens-per-node` tokens
as separate radix nodes, and times (median of 5 each) `admission_in_rows` on a PrefillAdder
stand-in with requests running, the walk it used to do (host Python, now only in the idle check) and the row
count of the walked tokens (tensor work a server does on its GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from sglang_kvc.allocator import CompressedTokenAllocator
from sglang_kvc.config import load_config
from sglang_kvc.patches.scheduler import admission_in_rows, evictable_tokens
from sglang_kvc.planner import ModelShape, RuntimeLimits, plan_for
from sglang_kvc.plugin import install_radix_cache_hooks
from sglang_kvc.pool import CompressedKVPool

LAYERS = 28  # Qwen2.5-7B


def cached_tree(config_path: Path, nodes: int, tokens_per_node: int) -> SimpleNamespace:
    """A pool, allocator and radix cache holding `nodes` unlocked prompts of distinct first
    tokens (each its own node under the root). Their ids hold no rows: the walk and the
    row count read the map whatever it says."""
    install_radix_cache_hooks()  # as in a scheduler: inserts keep the admission counter current
    logical_tokens = nodes * tokens_per_node + 64
    plan = plan_for(load_config(config_path), ModelShape(LAYERS, 1, 128, 4096), RuntimeLimits(2048, 64))
    pool = CompressedKVPool(logical_tokens, 1, torch.bfloat16, 1, 128, LAYERS, "cpu", plan=plan,
                            sizes=plan.sizes_for_tokens(logical_tokens))
    allocator = CompressedTokenAllocator(logical_tokens, torch.bfloat16, "cpu", pool)
    tree = RadixCache(CacheInitParams(disable=False, token_to_kv_pool_allocator=allocator, page_size=1,
                                      req_to_token_pool=ReqToTokenPool(size=4, max_context_len=64, device="cpu",
                                                                       enable_memory_saver=False)))
    for node in range(nodes):
        values = allocator.alloc(tokens_per_node)
        first = node * tokens_per_node
        key = list(range(first + 1, first + tokens_per_node + 1))
        tree.insert(InsertParams(key=RadixKey(key), value=values))
    return SimpleNamespace(pool=pool, allocator=allocator, tree=tree)


def _median_ms(run, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return round(statistics.median(seconds) * 1e3, 3)


def time_admission(state: SimpleNamespace, repeats: int = 5) -> dict:
    """The whole check (a read of the per-layer counter), and what it did before 2026-11-30 and
    the idle check still does: the walk over the radix nodes (host Python, as on a server) and
    the per-layer row count of the walked tokens (a gather and a sum over [layers, tokens]:
    CPU tensor work here, a GPU kernel and one sync on a server)."""
    # Requests running (the usual case while admitting): the check reads the counter's bound,
    # not the exact counts it reads when nothing runs.
    running = SimpleNamespace(is_empty=lambda: False)
    adder = SimpleNamespace(token_to_kv_pool_allocator=state.allocator, tree_cache=state.tree, running_batch=running,
                            rem_total_token_offset=0, cur_rem_token_offset=0)
    tokens = evictable_tokens(state.tree)
    # Whether the check gets past its early exit (rows already cover every logical token).
    past_early_exit = state.pool.headroom_tokens() < state.allocator.logical_available_size() + state.tree.evictable_size()
    return {
        "admission_ms": _median_ms(lambda: admission_in_rows(None, adder), repeats),
        "tree_walk_ms": _median_ms(lambda: evictable_tokens(state.tree), repeats),
        "row_count_ms_cpu": _median_ms(lambda: state.pool.rows_held(tokens).tolist(), repeats),
        "past_early_exit": past_early_exit,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/qwen_8x_tuned.yaml"))
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--tokens-per-node", type=int, default=8)
    args = parser.parse_args(argv)
    report = {"config": str(args.config), "tokens_per_node": args.tokens_per_node, "torch": torch.__version__,
              "layers": LAYERS, "by_nodes": {}}
    for nodes in args.nodes:
        state = cached_tree(args.config, nodes, args.tokens_per_node)
        result = {"evictable_tokens": state.tree.evictable_size(), **time_admission(state)}
        report["by_nodes"][str(nodes)] = result
        print(nodes, json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
