#!/usr/bin/env python3
"""Decode-attention and insert kernels of sglang_kvc.kernels against SGLang's own Triton
decode kernel, in one GPU call; JSON + a markdown table to --out.

What runs, for Qwen2.5-7B head shapes (28 query heads, 4 KV heads, head_dim 128):

  * the device's copy bandwidth: a device-to-device copy of a large buffer, counted as
    bytes read + bytes written per second (the ceiling the other rows are compared to);
  * per grid (batch x tokens per request) and shipped config (configs/*.yaml): one pool
    layer built directly, with the planner's retain ratio of the middle layer: each
    request keeps `layer_budget(retain, tokens - decode_window)` of its prompt (random
    positions; the guard share at guard precision, the rest low-bit) plus
    `decode_window` staged bf16 tokens, every other token evicted. Rows are random
    permutations of each tier's table (free lists of a long-running server hand out
    scattered rows), or with --row-order contiguous in request order (a fresh server's
    head-first free lists); tables hold random codes / values (timing does not depend on them).
    Timed: the Triton entry-list builder alone; `decode_attention` alone for several
    split counts (the engine's `decode_num_splits` choice among them), for the v1 split
    kernel (masked loads of every tier per block, BLOCK_N 16) and the v2 one (one loop
    per tier) at each BLOCK_N of --block-n (a variant that fails to compile is recorded
    as an error); and builder + attention together as the engine runs them
    (`decode_attention_for_pool`: v2 at its default BLOCK_N), and the same with v1; the
    engine's call once more replayed from a CUDA graph, as a server with decode graphs runs it;
  * SGLang's `decode_attention_fwd` on bf16 and fp8 (e4m3) KV over the same logical
    tokens (same slots), best of 8/16/64 KV splits (the best again from a CUDA graph);
  * `write_packed` (the insert kernel) for the low-bit share of a 32K prompt's kept
    tokens in one layer, with fp32 input as `CompressedKVPool.compress` passes it, next
    to the torch reference (`quant.quantize` + scatter).

Timing: `triton.testing.do_bench`, median of many runs (p20 / p80 kept), L2 flushed
before every run; each run includes the host-side launch glue, as in an eager forward.

    python eval/bench_kernels.py --out DIR                                 # on the GPU
    TRITON_INTERPRET=1 python eval/bench_kernels.py --smoke --out DIR      # CPU, tiny shapes

--smoke runs every code path on tiny shapes in the Triton interpreter, so that a test
keeps this script from rotting; its numbers mean nothing. SGLang's kernel then runs on
fp32 KV only (in the interpreter its bf16 dots come out wrong, fp8 is meaningless).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing

from sglang_kvc.attention import attend
from sglang_kvc.config import CompressionConfig, load_config
from sglang_kvc.engine import DecodeKernel, decode_block_n, decode_kernel, decode_num_splits
from sglang_kvc.kernels.decode_attention import (
    TIER_BITS,
    TIER_EVICTED,
    TIER_GUARD,
    TIER_LOWBIT,
    TIER_STAGING,
    decode_attention,
    decode_attention_for_pool,
    decode_entries,
    decode_entries_in_regions,
    held_per_block,
    layer_tables,
    region_indptr_for,
)
from sglang_kvc.kernels.quantize import write_packed
from sglang_kvc.planner import KVPlan, ModelShape, plan_for
from sglang_kvc.quant import quantize
from sglang_kvc.stores import DenseStore, PackedStore

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30


@dataclass(frozen=True)
class HeadShape:
    q_heads: int
    kv_heads: int
    head_dim: int
    num_layers: int
    context_len: int

    def model_shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.kv_heads, self.head_dim, self.context_len)


QWEN25_7B = HeadShape(q_heads=28, kv_heads=4, head_dim=128, num_layers=28, context_len=32768)
# The interpreter runs every program in Python: one KV head (GQA group 7 kept), short rows.
SMOKE_SHAPE = HeadShape(q_heads=7, kv_heads=1, head_dim=64, num_layers=28, context_len=32768)

GRIDS = ((1, 32768), (16, 32768), (48, 32768), (64, 8192), (8, 131072), (256, 4096))
# Long enough that a prompt (300 - decode_window) passes min_prompt_len and is compressed.
SMOKE_GRIDS = ((2, 300),)
PREFILL_TOKENS = 32768  # the write_packed case: one 32K prompt's kept tokens, one layer
SMOKE_PREFILL_TOKENS = 300

OUR_SPLITS = (4, 16, 64)  # swept next to the engine's choice
V2_BLOCK_NS = (16, 32, 64)  # v2's BLOCK_N sweep (v1 stays at its shipped 16)
V1_BLOCK_N = 16
ENGINE_BLOCK_N = 16  # always swept: the 3-bit-key choice of engine.decode_block_n
SMOKE_V2_BLOCK_NS = (16, 32)
# --candidates: the engine's kernel for K4V2 g64 (v5:64:r168:bf16:pairs:inplace, bench v20, its row
# offsets 32-bit where they fit) with 64-bit row offsets (as before the twenty-ninth session) and with
# the key codes in lane order (bench v21); the engine's own kernel joins them per config.
DEFAULT_CANDIDATES = "v5:64:r168:bf16:pairs:inplace:wide,v5:64:r168:bf16:pairs:inplace:lanekeys"
# A bf16-dot candidate's check: bf16 probabilities (TOLERANCE_BF16 in the decode kernel's tests).
BF16_DOT_TOLERANCE = 6e-3
SGLANG_SPLITS = (8, 16, 64)
SMOKE_SPLITS = (2,)
SMOKE_SGLANG_SPLITS = (2,)

ENTRY_BYTES = 5  # int8 tier + int32 row
LIST_BYTES_PER_LOGICAL_TOKEN = 8  # the builder reads req_to_token + location (int32 each)
SGLANG_INDEX_BYTES = 8  # kv_indices are int64
CHECK_REQUESTS = 2  # requests compared against the torch reference per (grid, config)


# ---- timing --------------------------------------------------------------------------------
class Timer:
    """Milliseconds per call: do_bench quantiles on CUDA; on CPU (the interpreter) one
    wall-clock call, only to exercise the code."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn) -> dict:
        if self.device.type == "cuda":
            median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return {"ms": median, "p20_ms": p20, "p80_ms": p80}
        start = time.perf_counter()
        fn()
        elapsed = (time.perf_counter() - start) * 1e3
        return {"ms": elapsed, "p20_ms": elapsed, "p80_ms": elapsed}

    def graph(self, fn) -> dict:
        """`fn` captured in a CUDA graph and timed as replays (L2 still flushed before
        each): what a server with decode graphs runs, without the eager launch glue. On
        CPU `fn` is called eagerly (the interpreter cannot capture)."""
        if self.device.type != "cuda":
            return self(fn)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the capture: compiles, allocator state
            fn()
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        timing = self(graph.replay)
        del graph
        return timing


def gbps(num_bytes: float, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


def copy_bandwidth(device: torch.device, timer: Timer, smoke: bool) -> dict:
    """Device-to-device copy: (bytes read + bytes written) per second."""
    num_bytes = (64 << 20) if smoke else 4 * GiB
    if device.type == "cuda":
        num_bytes = min(num_bytes, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.empty(num_bytes // 4, dtype=torch.int32, device=device).random_()
    dst = torch.empty_like(src)
    timing = timer(lambda: dst.copy_(src))
    del src, dst
    return {"buffer_bytes": num_bytes, **timing, "GBps": gbps(2 * num_bytes, timing["ms"])}


# ---- one pool layer ------------------------------------------------------------------------
@dataclass
class BenchLayer:
    """One layer of a CompressedKVPool, as `layer_tables` / `decode_attention_for_pool`
    read it (location [1, tokens + 1]), plus the per-request composition."""

    location: torch.Tensor
    staging: DenseStore
    lowbit: PackedStore
    guard: DenseStore | PackedStore
    staged_per_request: int
    guard_per_request: int
    lowbit_per_request: int

    @property
    def held_per_request(self) -> int:
        return self.staged_per_request + self.guard_per_request + self.lowbit_per_request


@dataclass
class Batch:
    """A decode batch: request b's tokens are req_to_token[b, :tokens] (random ids)."""

    req_to_token: torch.Tensor  # [B, tokens] int32
    req_pool_indices: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int32
    q: torch.Tensor  # [B, q_heads, head_dim] bf16
    batch_size: int
    tokens: int

    @classmethod
    def random(cls, batch_size: int, tokens: int, shape: HeadShape, device, contiguous: bool = False) -> "Batch":
        """Token ids (= SGLang's KV slots) a random permutation, or in request order
        with `contiguous` (a fresh server's allocator)."""
        count = batch_size * tokens
        token_ids = (torch.arange(count, device=device) if contiguous else torch.randperm(count, device=device)) + 1
        return cls(
            token_ids.view(batch_size, tokens).to(torch.int32),
            torch.arange(batch_size, device=device),
            torch.full((batch_size,), tokens, dtype=torch.int32, device=device),
            torch.randn(batch_size, shape.q_heads, shape.head_dim, device=device).to(torch.bfloat16),
            batch_size,
            tokens,
        )


def fill_random(store) -> None:
    if isinstance(store, DenseStore):
        for table in store.k + store.v:
            table.normal_()
        return
    for table in store.k_codes + store.v_codes:  # every bit pattern is a valid code word
        table.copy_(torch.randint(-(2**31), 2**31 - 1, table.shape, dtype=torch.int32, device=table.device))
    for table in store.k_scale_min + store.v_scale_min:
        table[..., 0].uniform_(0.01, 0.1)  # scale
        table[..., 1].uniform_(-1.0, 0.0)  # minimum


def build_layer(plan: KVPlan, layer: int, batch: Batch, contiguous_rows: bool = False) -> BenchLayer:
    """Every request: `decode_window` staged tokens at the end, its prompt compressed as
    the layer's budget says (kept positions drawn at random), the rest evicted. Each
    tier's rows are a random permutation, or with `contiguous_rows` handed out in
    (request, position) order as the head-first free lists of a fresh pool do."""
    config, device = plan.config, batch.req_to_token.device
    shape, tokens, batch_size = plan.shape, batch.tokens, batch.batch_size
    staged = min(config.quantization.decode_window, tokens)
    prompt_len = tokens - staged
    kept = config.layer_budget(plan.layer_retain_ratios[layer], prompt_len)
    guard = config.guard_count(kept)

    tiers = torch.full((batch_size, tokens), TIER_EVICTED, dtype=torch.int32, device=device)
    kept_positions = torch.rand(batch_size, prompt_len, device=device).argsort(dim=1)[:, :kept]
    tiers.scatter_(1, kept_positions[:, :guard], TIER_GUARD)
    tiers.scatter_(1, kept_positions[:, guard:], TIER_LOWBIT)
    tiers[:, prompt_len:] = TIER_STAGING
    del kept_positions

    locations = tiers.clone()  # EVICTED carries no row
    for tier in (TIER_STAGING, TIER_LOWBIT, TIER_GUARD):
        in_tier = tiers == tier
        count = int(in_tier.sum())
        rows = (torch.arange(count, device=device, dtype=torch.int32) if contiguous_rows
                else torch.randperm(count, device=device, dtype=torch.int32)) + 1
        locations[in_tier] = (rows << TIER_BITS) | tier
    location = torch.zeros((1, batch_size * tokens + 1), dtype=torch.int32, device=device)
    location[0, batch.req_to_token.view(-1).to(torch.int64)] = locations.view(-1)
    del tiers, locations

    heads, dim = shape.kv_heads, shape.head_dim
    staging = DenseStore([batch_size * staged], heads, dim, torch.bfloat16, device)
    lowbit = PackedStore([batch_size * (kept - guard)], heads, plan.key_format, plan.value_format, device)
    if plan.guard_format is None:
        guard_store = DenseStore([batch_size * guard], heads, dim, torch.bfloat16, device)
    else:
        guard_store = PackedStore([batch_size * guard], heads, plan.guard_format, plan.guard_format, device)
    for store in (staging, lowbit, guard_store):
        fill_random(store)
    return BenchLayer(location, staging, lowbit, guard_store, staged, guard, kept - guard)


def attention_bytes(plan: KVPlan, layer: BenchLayer, batch: Batch) -> dict:
    """Bytes the decode kernels must read for this layer (writes and the split-K partials
    are not counted; the entry list is counted once, as the KV-head programs of a
    request share it through L2)."""
    shape = plan.shape
    per_request = (
        layer.staged_per_request * DenseStore.bytes_per_row(shape.kv_heads, shape.head_dim)
        + layer.guard_per_request * plan.guard_row_bytes
        + layer.lowbit_per_request * plan.lowbit_row_bytes
    )
    payload = batch.batch_size * per_request
    entries = batch.batch_size * layer.held_per_request * ENTRY_BYTES
    queries = batch.q.numel() * batch.q.element_size()
    lists = batch.batch_size * batch.tokens * LIST_BYTES_PER_LOGICAL_TOKEN
    return {
        "payload": payload,
        "entries": entries,
        "queries": queries,
        "attention": payload + entries + queries,
        "entry_build": lists,
        "together": payload + entries + queries + lists,
    }


def reference_outputs(layer: BenchLayer, batch: Batch, scaling: float) -> tuple[torch.Tensor, float]:
    """`attention.attend` for the first requests over the rows the entry lists name,
    dequantized by the stores (as pool.gather does), and the largest |value| among them."""
    entries = decode_entries(layer.location[0], batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                             max_seq_len=batch.tokens)
    stores = {TIER_STAGING: layer.staging, TIER_LOWBIT: layer.lowbit, TIER_GUARD: layer.guard}
    indptr = entries.indptr.tolist()
    expected, value_scale = [], 0.0
    for b in range(min(CHECK_REQUESTS, batch.batch_size)):
        tiers = entries.tier[indptr[b] : indptr[b + 1]]
        rows = entries.row[indptr[b] : indptr[b + 1]].to(torch.int64)
        keys, values = zip(*(store.read(0, rows[tiers == tier], torch.float32) for tier, store in stores.items()))
        k, v = torch.cat(keys), torch.cat(values)
        no_positions = torch.zeros(k.shape[0], dtype=torch.int64, device=k.device)  # all precede the query
        expected.append(attend(batch.q[b : b + 1], no_positions[:1], k, v, no_positions, scaling)[0])
        value_scale = max(value_scale, float(v.abs().max()))
    return torch.stack(expected), value_scale


def reference_check(out: torch.Tensor, expected: torch.Tensor, value_scale: float, tolerance: float) -> dict:
    """Our output for the first requests against `reference_outputs`."""
    error = float((out[: expected.shape[0]] - expected).abs().max())
    if error != error:  # NaN: a row read that should not have been, or an unwritten output
        error = float("inf")
    return {"max_abs_error": error, "value_scale": value_scale, "tolerance": tolerance * value_scale,
            "ok": error <= tolerance * value_scale}


def best_of(by_splits: dict) -> int:
    return min(by_splits, key=lambda s: by_splits[s]["ms"])


def bench_ours(plan: KVPlan, layer_index: int, batch: Batch, args, timer: Timer, sm_count: int) -> dict:
    shape = plan.shape
    scaling = shape.head_dim**-0.5
    layer = build_layer(plan, layer_index, batch, contiguous_rows=args.row_order == "contiguous")
    tables = layer_tables(layer, 0)
    list_args = (layer.location[0], batch.req_to_token, batch.req_pool_indices, batch.seq_lens)
    list_sizes = {"max_seq_len": batch.tokens, "max_entries": batch.batch_size * batch.tokens}
    entries = decode_entries(*list_args, **list_sizes)
    out = torch.empty(batch.q.shape, dtype=torch.float32, device=batch.q.device)
    kernel_options = {"dot_precision": args.dot_precision, "num_stages": args.num_stages,
                      "num_warps": args.num_warps}

    def options(version) -> dict:  # --prefetch is an option of v2's low-bit loop
        return {**kernel_options, "prefetch": args.prefetch == "on"} if version == "v2" else kernel_options
    expected, value_scale = reference_outputs(layer, batch, scaling)
    tolerance = 2e-3 if batch.q.is_cuda else 1e-4  # tf32 dot operands on the GPU; fp32 in the interpreter

    def attention(version, splits, block_n):
        return lambda: decode_attention(
            batch.q, entries.indptr, entries.tier, entries.row, *tables, scaling, splits,
            tier_indptr=entries.tier_indptr, version=version, out=out, block_n=block_n, **options(version))

    def check(run, tolerance=tolerance) -> dict:
        out.fill_(float("nan"))  # a variant must write every output itself
        run()
        return reference_check(out, expected, value_scale, tolerance)

    engine_splits = decode_num_splits(batch.batch_size, shape.kv_heads, batch.tokens, sm_count)
    engine_block_n = decode_block_n(plan.key_format.bits)
    region_indptr = region_indptr_for([batch.tokens] * batch.batch_size, batch.q.device)
    splits_options = sorted({engine_splits, *args.splits})

    def sweep(version, block_n) -> dict:
        """One kernel variant at every split count, and its output checked once."""
        by_splits = {splits: timer(attention(version, splits, block_n)) for splits in splits_options}
        best = best_of(by_splits)
        return {"block_n": block_n, "by_splits": by_splits, "best_splits": best, "ms": by_splits[best]["ms"],
                "check": check(attention(version, best, block_n))}

    v1 = sweep("v1", V1_BLOCK_N)
    v2_by_block_n = {block_n: guarded(sweep, "v2", block_n) for block_n in args.block_n}
    compiled = {n: variant for n, variant in v2_by_block_n.items() if "error" not in variant}
    if engine_block_n not in compiled:
        engine_block_n = ENGINE_BLOCK_N  # not swept (a --block-n subset) or failed: fall back
    if engine_block_n not in compiled:
        raise RuntimeError(f"v2 at BLOCK_N {engine_block_n} failed: {v2_by_block_n.get(engine_block_n)}")
    best_block_n = min(compiled, key=lambda n: compiled[n]["ms"])
    v2_best = compiled[best_block_n]

    def together(version, splits, block_n, regions=True, **overrides):
        """Entry build + attention through decode_attention_for_pool, as the engine calls it
        (the one-launch region builder), or with the CSR builder (`decode_entries`);
        `overrides` replace the command line's kernel options."""
        builder = {"region_indptr": region_indptr} if regions else {}
        return lambda: decode_attention_for_pool(layer, 0, batch.q, batch.req_to_token, batch.req_pool_indices,
                                                 batch.seq_lens, scaling, splits, out=out, version=version,
                                                 block_n=block_n, **list_sizes, **builder,
                                                 **{**options(version), **overrides})

    # What the engine runs (v2, its BLOCK_N and split count, region lists), the same with the
    # CSR builder, v1 on the CSR builder, and v2's best variant if it is another one.
    together_ms = {"v2": timer(together("v2", engine_splits, engine_block_n)),
                   "v2_csr_builder": timer(together("v2", engine_splits, engine_block_n, regions=False)),
                   "v1": timer(together("v1", engine_splits, V1_BLOCK_N, regions=False))}
    if (best_block_n, v2_best["best_splits"]) != (engine_block_n, engine_splits):
        together_ms["v2_best"] = timer(together("v2", v2_best["best_splits"], best_block_n))
    # The engine's call as the server runs it: inside a decode CUDA graph.
    together_ms["v2_graph"] = guarded(timer.graph, together("v2", engine_splits, engine_block_n))
    checks = {"v1": v1["check"], **{f"v2_block_n_{n}": variant["check"] for n, variant in compiled.items()},
              "engine": check(together("v2", engine_splits, engine_block_n)),
              "v1_on_regions": check(together("v1", engine_splits, V1_BLOCK_N))}
    # Candidate kernels (--candidates VERSION:BLOCK_N, and the engine's own choice for this config
    # when it is not v2) called as the engine calls v2 (its split count, region lists), eager and
    # from a graph, each checked.
    engine_choice = decode_kernel(plan.key_format, plan.value_format)
    candidates = list(args.candidates)
    if engine_choice.version != "v2" and engine_choice not in candidates:
        candidates.append(engine_choice)
    for candidate in candidates:
        run = together(candidate.version, engine_splits, candidate.block_n,
                       **candidate_options(candidate, kernel_options))
        together_ms[candidate.name] = guarded(timer, run)
        together_ms[f"{candidate.name}_graph"] = guarded(timer.graph, run)
        checks[candidate.name] = guarded(check, run, candidate_tolerance(candidate, tolerance))
        # --candidate-splits: the same call from a graph at other split counts (whether the
        # engine's count, set for v2's programs per SM, suits the kernel).
        for splits in sorted(set(args.candidate_splits) - {engine_splits}):
            together_ms[f"{candidate.name}_splits_{splits}_graph"] = guarded(
                timer.graph, together(candidate.version, splits, candidate.block_n,
                                      **candidate_options(candidate, kernel_options)))

    num_bytes = attention_bytes(plan, layer, batch)
    all_layers_location = layer.location[0].expand(shape.num_layers, -1).contiguous()
    layer_counts = held_per_block(layer.location[0], *list_args[1:], batch.tokens)
    result = {
        "per_request": {"tokens": batch.tokens, "held": layer.held_per_request, "staged": layer.staged_per_request,
                        "guard": layer.guard_per_request, "lowbit": layer.lowbit_per_request},
        "bytes": num_bytes,
        "entry_build": timer(lambda: decode_entries_in_regions(*list_args, region_indptr,
                                                               list_sizes["max_entries"], batch.tokens)),
        "entry_build_csr": timer(lambda: decode_entries(*list_args, **list_sizes)),
        # As a decode pass runs it: every layer's counts in one launch at the first layer
        # (timed on this layer's map repeated for each of the model's layers), then one
        # scatter per layer from its slice.
        "entry_count_all_layers": timer(lambda: held_per_block(all_layers_location, *list_args[1:], batch.tokens)),
        "entry_build_from_counts": timer(lambda: decode_entries_in_regions(
            *list_args, region_indptr, list_sizes["max_entries"], batch.tokens, block_counts=layer_counts)),
        # What the engine runs for this config (engine.decode_kernel); v2 at v2's BLOCK_N is the
        # baseline every table but the candidates' reports.
        "engine_kernel": {"version": engine_choice.version, "block_n": engine_choice.block_n, "entry_lists": "regions",
                          "name": engine_choice.name},
        "v2_kernel": {"version": "v2", "block_n": engine_block_n, "entry_lists": "regions"},
        "candidates": [candidate.name for candidate in candidates],
        # v2 at its BLOCK_N at every split count.
        "attention_by_splits": compiled[engine_block_n]["by_splits"],
        "engine_splits": engine_splits,
        "best_splits": compiled[engine_block_n]["best_splits"],
        "attention": {
            "v1": v1,
            "v2": {"by_block_n": v2_by_block_n, "best_block_n": best_block_n,
                   "best_splits": v2_best["best_splits"], "ms": v2_best["ms"]},
        },
        "together": together_ms,
        "check": {"ok": all(c.get("ok", False) for c in checks.values()),
                  "max_abs_error": max(c.get("max_abs_error", float("inf")) for c in checks.values()),
                  "by_variant": checks},
    }
    del layer, tables, entries, out
    return result


# ---- SGLang's decode kernel ------------------------------------------------------------------
def bench_sglang(batch: Batch, shape: HeadShape, dtype: torch.dtype, splits_options, timer: Timer) -> dict:
    """SGLang's Triton decode (the path of its `triton` attention backend) over the same
    logical tokens: KV slot = token id, kv_indices = the requests' token ids. Eager at
    each split count; the best one again as CUDA-graph replays."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    device, batch_size = batch.q.device, batch.batch_size
    slots = batch.batch_size * batch.tokens + 1
    # Drawn in bf16 (no fp32 temporary the size of the cache), then cast.
    k_buffer = torch.randn(slots, shape.kv_heads, shape.head_dim, dtype=torch.bfloat16, device=device).to(dtype)
    v_buffer = torch.randn(slots, shape.kv_heads, shape.head_dim, dtype=torch.bfloat16, device=device).to(dtype)
    kv_indptr = torch.arange(0, slots, batch.tokens, dtype=torch.int32, device=device)
    kv_indices = batch.req_to_token.view(-1).to(torch.int64)
    q = batch.q if dtype != torch.float32 else batch.q.float()
    o = torch.empty(batch.q.shape, dtype=q.dtype, device=device)

    def call(splits):
        attn_logits = torch.empty(batch_size, shape.q_heads, splits, shape.head_dim, dtype=torch.float32, device=device)
        attn_lse = torch.empty(batch_size, shape.q_heads, splits, dtype=torch.float32, device=device)
        num_kv_splits = torch.full((batch_size,), splits, dtype=torch.int32, device=device)
        return lambda: decode_attention_fwd(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, attn_lse,
                                            num_kv_splits, splits, shape.head_dim**-0.5, 1.0, 1.0)

    by_splits = {splits: timer(call(splits)) for splits in splits_options}
    best_splits = min(by_splits, key=lambda s: by_splits[s]["ms"])
    graph = guarded(timer.graph, call(best_splits))
    num_bytes = (batch.batch_size * batch.tokens * (2 * shape.kv_heads * shape.head_dim * dtype.itemsize
                                                    + SGLANG_INDEX_BYTES)
                 + batch.q.numel() * batch.q.element_size())
    del k_buffer, v_buffer
    return {"by_splits": by_splits, "best_splits": best_splits, "ms": by_splits[best_splits]["ms"],
            "graph": graph, "bytes": num_bytes}


# ---- write_packed ----------------------------------------------------------------------------
def bench_write_packed(plan: KVPlan, layer_index: int, prompt_tokens: int, device, timer: Timer) -> dict:
    """The low-bit share of one prompt's kept tokens in one layer, fp32 input (what
    `CompressedKVPool.compress` passes), against `quant.quantize` + scatter."""
    config, shape = plan.config, plan.shape
    kept = config.layer_budget(plan.layer_retain_ratios[layer_index], prompt_tokens)
    count = kept - config.guard_count(kept)
    store = PackedStore([count], shape.kv_heads, plan.key_format, plan.value_format, device)
    rows = torch.randperm(count, device=device) + 1
    k = torch.randn(count, shape.kv_heads, shape.head_dim, device=device)
    v = torch.randn(count, shape.kv_heads, shape.head_dim, device=device)

    def torch_reference():
        for fmt, x, codes, scale_min in ((plan.key_format, k, store.k_codes[0], store.k_scale_min[0]),
                                         (plan.value_format, v, store.v_codes[0], store.v_scale_min[0])):
            codes[rows], scale_min[rows] = quantize(x, fmt)

    kernel = timer(lambda: write_packed(store, 0, rows, k, v))
    reference = timer(torch_reference)
    read = 2 * k.numel() * k.element_size()
    written = count * plan.lowbit_row_bytes
    return {"prompt_tokens": prompt_tokens, "tokens": count, "bytes_read": read, "bytes_written": written,
            "kernel": kernel, "torch_reference": reference,
            "kernel_GBps": gbps(read + written, kernel["ms"]), "speedup_vs_torch": reference["ms"] / kernel["ms"]}


# ---- window scores -----------------------------------------------------------------------------
def bench_window_scores(shape: HeadShape, prompt_tokens: int, window: int, device, timer: Timer) -> dict:
    """Scoring one layer's staged prompt tokens with the observation window: the Triton
    two-pass kernel (`kernels/score.py`) against the torch scorer, which holds the
    [kv_heads, group * W, N] fp32 attention (its size is reported)."""
    from sglang_kvc.kernels.score import window_scores
    from sglang_kvc.policy import ObservationWindowScorer

    q = torch.randn(window, shape.q_heads, shape.head_dim, device=device).to(torch.bfloat16)
    k = torch.randn(prompt_tokens, shape.kv_heads, shape.head_dim, device=device).to(torch.bfloat16)
    key_positions = torch.arange(prompt_tokens, device=device)
    window_positions = key_positions[-window:]
    args = (q, window_positions, k, key_positions)
    torch_scorer = ObservationWindowScorer()
    got, expected = window_scores(*args), torch_scorer.per_kv_head(*args)
    kernel, reference = timer(lambda: window_scores(*args)), timer(lambda: torch_scorer.per_kv_head(*args))
    return {"prompt_tokens": prompt_tokens, "window": window, "kernel": kernel, "torch_reference": reference,
            "speedup_vs_torch": reference["ms"] / kernel["ms"],
            "torch_attention_bytes": shape.q_heads * window * prompt_tokens * 4,
            "max_abs_error": float((got - expected).abs().max())}


# ---- report ----------------------------------------------------------------------------------
def summarize(result: dict, sglang: dict, copy_gbps: float) -> dict:
    """Throughput and ratios of one (grid, config) cell: attention alone at the best
    variant of v1 and of v2; "together" as the engine runs it (v2)."""
    num_bytes = result["bytes"]
    v1_ms = result["attention"]["v1"]["ms"]
    v2_ms = result["attention"]["v2"]["ms"]
    together_ms = result["together"]["v2"]["ms"]
    summary = {
        "attention_best_GBps": gbps(num_bytes["attention"], v2_ms),
        "attention_v1_best_GBps": gbps(num_bytes["attention"], v1_ms),
        "v2_speedup_vs_v1": {"attention_best": v1_ms / v2_ms,
                             "together": result["together"]["v1"]["ms"] / together_ms},
        "together_GBps": gbps(num_bytes["together"], together_ms),
        "together_v1_GBps": gbps(num_bytes["together"], result["together"]["v1"]["ms"]),
    }
    summary["attention_best_fraction_of_copy_bw"] = summary["attention_best_GBps"] / copy_gbps
    summary["attention_v1_best_fraction_of_copy_bw"] = summary["attention_v1_best_GBps"] / copy_gbps
    summary["together_fraction_of_copy_bw"] = summary["together_GBps"] / copy_gbps
    graph_ms = result["together"]["v2_graph"].get("ms")
    if graph_ms is not None:
        summary["together_graph_GBps"] = gbps(num_bytes["together"], graph_ms)
        summary["together_graph_fraction_of_copy_bw"] = summary["together_graph_GBps"] / copy_gbps
    for name, baseline in sglang.items():
        if "ms" not in baseline:
            continue
        summary[f"speedup_vs_{name}"] = {"attention_best": baseline["ms"] / v2_ms,
                                         "attention_v1_best": baseline["ms"] / v1_ms,
                                         "together": baseline["ms"] / together_ms}
        if graph_ms is not None and "ms" in baseline.get("graph", {}):
            summary[f"speedup_vs_{name}"]["together_graph"] = baseline["graph"]["ms"] / graph_ms
        summary[f"byte_ratio_vs_{name}"] = {"attention": baseline["bytes"] / num_bytes["attention"],
                                            "together": baseline["bytes"] / num_bytes["together"]}
    return summary


def markdown(report: dict) -> str:
    baselines = report["sglang_dtypes"]
    lines = [
        f"# Kernel benchmark ({report['date']}, {report['device']})",
        "",
        f"`{report['command']}`",
        "",
        f"torch {report['versions']['torch']}, triton {report['versions']['triton']}, "
        f"sglang {report['versions']['sglang']}. Copy bandwidth (read + write): "
        f"{report['copy_bandwidth']['GBps']:.0f} GB/s. Times: ms per layer call ({report['timing']}). "
        f"\"attn\" = attention alone, best split count (v2: best of BLOCK_N {report['v2_block_n']}, "
        f"shown as BLOCK_N / splits; v1: BLOCK_N {report['v1_block_n']}). \"together\" = entry-list build + "
        f"attention at the engine's split count, as the engine ran them until 2026-12-01 (v2, BLOCK_N "
        f"{report['engine_block_n']}, "
        f"entry lists in fixed regions, one launch; v1 on the CSR builder in parentheses). \"build ms\": the "
        f"region builder (CSR builder in parentheses). GB/s = bytes that must be read / time. Speedups vs SGLang: together. "
        f"The engine's kernel per config now (engine.decode_kernel) is marked \"(engine)\" among the candidates at the end.",
        "",
        f"Split kernels: {report.get('num_warps', 4)} warps, num_stages {report['num_stages'] or 'Triton default'}, "
        f"v2 prefetch {report.get('prefetch', 'off')}, "
        f"dots {report['dot_precision']}. Rows: {report['row_order']}.",
        "",
        f"Bytes counted: {report['bytes_counted']}",
        "",
        "| grid | config | held / req | engine splits | build ms | v2 best: BLOCK_N / splits | v2 attn ms | "
        "v1 attn ms | v2 / v1 speedup | v2 attn GB/s (v1) | together ms (v1) | together GB/s | % copy BW | "
        + " | ".join(f"{b} ms | speedup vs {b} | byte ratio vs {b}" for b in baselines) + " | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|---|---|" * len(baselines) + "---|",
    ]
    for grid in report["grids"]:
        label = f"{grid['batch']}x{grid['tokens']}"
        if grid["status"] != "ok":
            lines.append(f"| {label} | {grid['status']} |")
            continue
        for name, cell in grid["configs"].items():
            if "error" in cell:
                lines.append(f"| {label} | {name} | error: {cell['error']} |")
                continue
            s = cell["summary"]
            v1, v2 = cell["attention"]["v1"], cell["attention"]["v2"]
            row = [label, name, str(cell["per_request"]["held"]), str(cell["engine_splits"]),
                   f"{cell['entry_build']['ms']:.3f} ({cell['entry_build_csr']['ms']:.3f})",
                   f"{v2['best_block_n']} / {v2['best_splits']}",
                   f"{v2['ms']:.3f}", f"{v1['ms']:.3f}", f"{s['v2_speedup_vs_v1']['attention_best']:.2f}x",
                   f"{s['attention_best_GBps']:.0f} ({s['attention_v1_best_GBps']:.0f})",
                   f"{cell['together']['v2']['ms']:.3f} ({cell['together']['v1']['ms']:.3f})",
                   f"{s['together_GBps']:.0f}", f"{100 * s['together_fraction_of_copy_bw']:.0f}%"]
            for b in baselines:
                baseline = grid["sglang"].get(b, {})
                if "ms" in baseline:
                    row += [f"{baseline['ms']:.3f}", f"{s[f'speedup_vs_{b}']['together']:.2f}x",
                            f"{s[f'byte_ratio_vs_{b}']['together']:.2f}x"]
                else:
                    row += ["-", "-", "-"]
            failed = [v for v, c in cell["check"]["by_variant"].items() if not c["ok"]]
            row.append("ok" if not failed else f"FAIL {', '.join(failed)} ({cell['check']['max_abs_error']:.2e})")
            lines.append("| " + " | ".join(row) + " |")
    lines += graph_table(report)
    lines += candidates_table(report)
    lines += candidate_splits_table(report)
    lines += [f"\nSGLang {label} {b}: {grid['sglang'][b]['error']}" for grid in report["grids"]
              for label in [f"{grid['batch']}x{grid['tokens']}"] for b in grid.get("sglang", {})
              if "error" in grid["sglang"][b]]
    lines += [f"\nv2 {grid['batch']}x{grid['tokens']} {name} BLOCK_N {n}: {variant['error']}"
              for grid in report["grids"] for name, cell in grid.get("configs", {}).items() if "attention" in cell
              for n, variant in cell["attention"]["v2"]["by_block_n"].items() if "error" in variant]
    lines += ["", "write_packed (low-bit share of one prompt's kept tokens, one layer, fp32 input):", "",
              "| config | tokens | kernel ms | GB/s | torch ms | speedup |", "|---|---|---|---|---|---|"]
    for name, w in report["write_packed"].items():
        if "error" in w:
            lines.append(f"| {name} | error: {w['error']} |")
            continue
        lines.append(f"| {name} | {w['tokens']} | {w['kernel']['ms']:.3f} | {w['kernel_GBps']:.0f} | "
                     f"{w['torch_reference']['ms']:.3f} | {w['speedup_vs_torch']:.1f}x |")
    score = report.get("window_scores")
    if score and "error" not in score:
        lines += ["", f"Window scores of one layer ({score['prompt_tokens']} staged tokens, W {score['window']}): "
                      f"kernel {score['kernel']['ms']:.3f} ms, torch {score['torch_reference']['ms']:.3f} ms "
                      f"({score['speedup_vs_torch']:.1f}x; torch holds {score['torch_attention_bytes'] / 2**20:.0f} MiB "
                      f"of attention), max abs difference {score['max_abs_error']:.1e}."]
    elif score:
        lines += ["", f"Window scores: error: {score['error']}"]
    return "\n".join(lines) + "\n"


def graph_table(report: dict) -> list[str]:
    """The engine's call ("together", v2) and SGLang's kernel at its best split count,
    both replayed from CUDA graphs as a server with decode graphs runs them."""
    baselines = report["sglang_dtypes"]
    lines = ["", "CUDA-graph replay (no eager launch glue; L2 flushed before each replay):", "",
             "| grid | config | together ms | GB/s | % copy BW | "
             + " | ".join(f"{b} ms | speedup vs {b} | byte ratio vs {b} | speedup / byte ratio" for b in baselines)
             + " |",
             "|---|---|---|---|---|" + "---|---|---|---|" * len(baselines)]
    for grid in report["grids"]:
        label = f"{grid['batch']}x{grid['tokens']}"
        for name, cell in grid.get("configs", {}).items():
            if "error" in cell:
                continue
            graph, s = cell["together"]["v2_graph"], cell["summary"]
            if "ms" not in graph:
                lines.append(f"| {label} | {name} | error: {graph['error']} |")
                continue
            row = [label, name, f"{graph['ms']:.3f}", f"{s['together_graph_GBps']:.0f}",
                   f"{100 * s['together_graph_fraction_of_copy_bw']:.0f}%"]
            for b in baselines:
                baseline = grid["sglang"].get(b, {}).get("graph", {})
                speedup = s.get(f"speedup_vs_{b}", {}).get("together_graph")
                if "ms" in baseline and speedup is not None:
                    byte_ratio = s[f"byte_ratio_vs_{b}"]["together"]
                    row += [f"{baseline['ms']:.3f}", f"{speedup:.2f}x", f"{byte_ratio:.2f}x",
                            f"{speedup / byte_ratio:.2f}"]
                else:
                    row += ["-", "-", "-", "-"]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def candidate_options(candidate: DecodeKernel, defaults: dict) -> dict:
    """decode_attention's keyword arguments for a candidate but its version and BLOCK_N (which
    `together` takes): the command line's (`defaults`) with the candidate's own."""
    own = candidate.arguments()
    del own["version"], own["block_n"]
    return {**defaults, **own}


def candidate_tolerance(candidate: DecodeKernel, default: float) -> float:
    """A candidate's check tolerance: bf16 probabilities carry 8 significant bits, not tf32's 11."""
    return max(default, BF16_DOT_TOLERANCE) if candidate.dot_precision == "bf16" else default


def parse_candidates(text: str) -> list[DecodeKernel]:
    """"v5:64,v5:64:bf16,v5:128:w8" -> DecodeKernels (DecodeKernel.parse, one per item); "" -> none."""
    try:
        return [DecodeKernel.parse(item) for item in filter(None, text.split(","))]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def candidates_table(report: dict) -> list[str]:
    """Each --candidates kernel against v2, both as the engine calls them from a CUDA graph."""
    baselines = report["sglang_dtypes"]
    lines = ["", "Candidates (VERSION_block_n_N) against v2 at the engine's BLOCK_N, CUDA-graph replay of the "
             "engine's call (same split count and lists):", "",
             "| grid | config | candidate | v2 ms | candidate ms | candidate / v2 | GB/s | % copy BW | "
             + " | ".join(f"speedup vs {b} | speedup / byte ratio" for b in baselines) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|---|" * len(baselines)]
    copy_gbps = report["copy_bandwidth"]["GBps"]
    for grid in report["grids"]:
        label = f"{grid['batch']}x{grid['tokens']}"
        for name, cell in grid.get("configs", {}).items():
            if "error" in cell:
                continue
            engine = cell["engine_kernel"].get("name") or DecodeKernel(cell["engine_kernel"]["version"],
                                                                       cell["engine_kernel"]["block_n"]).name
            for candidate in cell.get("candidates", report.get("candidates", [])):
                v2, ours = cell["together"]["v2_graph"], cell["together"].get(f"{candidate}_graph", {})
                label_candidate = f"{candidate} (engine)" if candidate == engine else candidate
                if "ms" not in v2 or "ms" not in ours:
                    lines.append(f"| {label} | {name} | {label_candidate} | error: {ours.get('error') or v2.get('error')} |")
                    continue
                ours_gbps = gbps(cell["bytes"]["together"], ours["ms"])
                row = [label, name, label_candidate, f"{v2['ms']:.3f}", f"{ours['ms']:.3f}", f"{ours['ms'] / v2['ms']:.2f}",
                       f"{ours_gbps:.0f}", f"{100 * ours_gbps / copy_gbps:.0f}%"]
                for b in baselines:
                    baseline = grid["sglang"].get(b, {}).get("graph", {})
                    if "ms" in baseline:
                        speedup = baseline["ms"] / ours["ms"]
                        row += [f"{speedup:.2f}x",
                                f"{speedup / cell['summary'][f'byte_ratio_vs_{b}']['together']:.2f}"]
                    else:
                        row += ["-", "-"]
                lines.append("| " + " | ".join(row) + " |")
    return lines


def candidate_splits_table(report: dict) -> list[str]:
    """Each candidate's graph replay at --candidate-splits, next to the engine's split count."""
    counts = report.get("candidate_splits") or []
    if not counts:
        return []
    lines = ["", "Candidates at other split counts (CUDA-graph replay, ms; * = the engine's count, as above):", "",
             "| grid | config | candidate | engine splits: ms | " + " | ".join(f"{n} splits" for n in counts) + " |",
             "|---|---|---|---|" + "---|" * len(counts)]
    for grid in report["grids"]:
        label = f"{grid['batch']}x{grid['tokens']}"
        for name, cell in grid.get("configs", {}).items():
            if "error" in cell:
                continue
            for candidate in cell.get("candidates", []):
                at_engine = cell["together"].get(f"{candidate}_graph", {})
                row = [label, name, candidate, f"{cell['engine_splits']}: {at_engine.get('ms', float('nan')):.3f}"]
                for count in counts:
                    timed = at_engine if count == cell["engine_splits"] else cell["together"].get(
                        f"{candidate}_splits_{count}_graph", {})
                    mark = "*" if count == cell["engine_splits"] else ""
                    row.append(f"{timed['ms']:.3f}{mark}" if "ms" in timed else f"error: {timed.get('error')}")
                lines.append("| " + " | ".join(row) + " |")
    return lines


def write_outputs(report: dict, out_dir: Path) -> None:
    (out_dir / "bench_kernels.json").write_text(json.dumps(report, indent=1))
    (out_dir / "bench_kernels.md").write_text(markdown(report))


def fits(batch_size: int, tokens: int, shape: HeadShape, device: torch.device) -> str | None:
    """None if the grid's largest allocation set fits in free device memory, else why not.
    Peak: SGLang's bf16 K/V buffers plus the shared batch tensors and the build's
    temporaries (argsort keys, permutations, masks: < 128 B per token)."""
    if device.type != "cuda":
        return None
    logical = batch_size * tokens
    need = logical * (DenseStore.bytes_per_row(shape.kv_heads, shape.head_dim) + 128) + GiB
    free = torch.cuda.mem_get_info(device)[0]
    if need > 0.9 * free:
        return f"skipped: needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
    return None


def guarded(measure, *args) -> dict:
    """A failed measurement (out of memory, a kernel that does not compile) is recorded
    and the run goes on: one GPU call has to bring back everything else."""
    try:
        return measure(*args)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_grid(text: str) -> tuple[int, int]:
    batch_size, tokens = text.lower().split("x")
    return int(batch_size), int(tokens)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_kernels.json / .md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU with TRITON_INTERPRET=1")
    parser.add_argument("--configs", nargs="*", type=Path, default=sorted((REPO / "configs").glob("*.yaml")))
    parser.add_argument("--grids", nargs="*", type=parse_grid, help="BxTOKENS, e.g. 16x32768")
    parser.add_argument("--splits", type=lambda s: [int(x) for x in s.split(",")],
                        help=f"our split counts swept next to the engine's (default {OUR_SPLITS})")
    parser.add_argument("--sglang-splits", type=lambda s: [int(x) for x in s.split(",")],
                        help=f"SGLang kv splits, best reported (default {SGLANG_SPLITS})")
    parser.add_argument("--block-n", type=lambda s: [int(x) for x in s.split(",")],
                        help=f"v2 BLOCK_N values swept (default {V2_BLOCK_NS}; must include {ENGINE_BLOCK_N})")
    parser.add_argument("--num-stages", type=int, help="pipelining depth of both split kernels (default: Triton's)")
    parser.add_argument("--num-warps", type=int, default=4, help="warps per program of both split kernels")
    parser.add_argument("--prefetch", default="on", choices=["on", "off"],
                        help="v2's low-bit loop pipelined by hand (decode_attention's prefetch; on by default)")
    parser.add_argument("--dot-precision", default="auto", choices=["auto", "tf32", "fp16", "ieee"],
                        help="decode_attention's dot_precision (auto: fp16 on packed rows, tf32 on bf16 rows)")
    parser.add_argument("--candidates", type=parse_candidates, default=parse_candidates(DEFAULT_CANDIDATES),
                        help=f"kernels compared with the engine's v2, as {DecodeKernel.FORM},... "
                             f"(default {DEFAULT_CANDIDATES}; '' for none)")
    parser.add_argument("--candidate-splits", type=lambda s: [int(x) for x in s.split(",")], default=[],
                        help="split counts at which each candidate is also timed from a graph (default: only "
                             "the engine's)")
    parser.add_argument("--row-order", default="random", choices=["random", "contiguous"],
                        help="rows of each tier (and SGLang's slots): a random permutation (a long-running "
                             "server's scattered free lists) or in request order (a fresh server)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("no GPU: run with TRITON_INTERPRET=1 (and --smoke)")
    shape = SMOKE_SHAPE if args.smoke else QWEN25_7B
    grids = args.grids or (SMOKE_GRIDS if args.smoke else GRIDS)
    args.splits = args.splits or (SMOKE_SPLITS if args.smoke else OUR_SPLITS)
    args.block_n = sorted({ENGINE_BLOCK_N, *(args.block_n or (SMOKE_V2_BLOCK_NS if args.smoke else V2_BLOCK_NS))})
    sglang_splits = args.sglang_splits or (SMOKE_SGLANG_SPLITS if args.smoke else SGLANG_SPLITS)
    sglang_dtypes = ((torch.bfloat16, torch.float8_e4m3fn) if device.type == "cuda" else (torch.float32,))
    prompt_tokens = SMOKE_PREFILL_TOKENS if args.smoke else PREFILL_TOKENS
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(device)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    torch.manual_seed(0)

    plans = {}
    for path in args.configs:
        config: CompressionConfig = load_config(path)
        plans[config.name] = plan_for(config, shape.model_shape())
    middle_layer = shape.num_layers // 2
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "sm_count": sm_count,
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "sglang": importlib.metadata.version("sglang"), "python": platform.python_version()},
        "command": shlex.join([os.path.basename(sys.executable), os.path.relpath(__file__), *argv]),
        "smoke": args.smoke,
        "shape": vars(shape),
        "layer": middle_layer,
        "dot_precision": args.dot_precision,
        "num_stages": args.num_stages,
        "num_warps": args.num_warps,
        "prefetch": args.prefetch,
        "v1_block_n": V1_BLOCK_N,
        "v2_block_n": args.block_n,
        "engine_block_n": "engine.decode_block_n: 16 for 3-bit keys, else 64 (per cell: engine_kernel)",
        "timing": "triton.testing.do_bench median (p20/p80 kept), L2 flushed before each run, host launch "
                  "glue included (eager mode); the graph table replays CUDA graphs instead"
                  if device.type == "cuda" else "wall clock, interpreter (meaningless)",
        "bytes_counted": "reads only. ours: payload = held rows (bf16 staging + guard rows + low-bit codes and "
                         "fp16 scale/min pairs, K and V, all KV heads), entry lists 5 B per held token "
                         "(once; v2 reads only the 4 B row), queries; entry build: req_to_token + location, 4 + 4 B per logical token "
                         "(once; the builder passes twice). SGLang: K + V of every logical token at its "
                         "dtype + int64 kv_indices + queries. Split-K partials and outputs not counted.",
        "row_order": {"random": "random permutation of each tier's rows (and of SGLang's slots)",
                      "contiguous": "each tier's rows (and SGLang's slots) in (request, position) order"}[args.row_order],
        "sglang_dtypes": [dtype_name(d) for d in sglang_dtypes],
        "candidates": [candidate.name for candidate in args.candidates],
        "candidate_splits": sorted(args.candidate_splits),
        "configs": {name: {"retain_ratio_of_layer": plan.layer_retain_ratios[middle_layer],
                           "guard_fraction": plan.config.quantization.guard_fraction,
                           "decode_window": plan.config.quantization.decode_window,
                           "key_bits": plan.key_format.bits, "value_bits": plan.value_format.bits,
                           "group_size": plan.key_format.group_size,
                           "guard_bits": plan.config.quantization.guard_bits,
                           "row_bytes": {"lowbit": plan.lowbit_row_bytes, "guard": plan.guard_row_bytes}}
                    for name, plan in plans.items()},
        "grids": [],
        "write_packed": {},
    }
    report["copy_bandwidth"] = copy_bandwidth(device, timer, args.smoke)
    copy_gbps = report["copy_bandwidth"]["GBps"]
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)

    for name, plan in plans.items():
        report["write_packed"][name] = guarded(bench_write_packed, plan, middle_layer, prompt_tokens, device, timer)
    window = next(iter(plans.values())).config.sparsity.observation_window
    report["window_scores"] = guarded(bench_window_scores, shape, prompt_tokens, window, device, timer)
    write_outputs(report, args.out)

    for batch_size, tokens in grids:
        grid = {"batch": batch_size, "tokens": tokens, "status": fits(batch_size, tokens, shape, device) or "ok"}
        report["grids"].append(grid)
        if grid["status"] == "ok":
            batch = Batch.random(batch_size, tokens, shape, device, contiguous=args.row_order == "contiguous")
            grid["sglang"] = {dtype_name(dtype): guarded(bench_sglang, batch, shape, dtype, sglang_splits, timer)
                              for dtype in sglang_dtypes}
            grid["configs"] = {}
            for name, plan in plans.items():
                cell = guarded(bench_ours, plan, middle_layer, batch, args, timer, sm_count)
                if "error" not in cell:
                    cell["summary"] = summarize(cell, grid["sglang"], copy_gbps)
                grid["configs"][name] = cell
            del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"grid {batch_size}x{tokens}: {grid['status']}", flush=True)
        write_outputs(report, args.out)  # after every grid: a timeout keeps what was measured
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
