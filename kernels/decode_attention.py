"""Decode attention straight from the tiered pool: packed codes are dequantized in
registers, never written back to global memory as bf16.

Inputs, per layer:
  * per request a list of entries (tier, row), CSR-style: request b owns entries
    `entries_indptr[b] : entries_indptr[b + 1]`; `decode_entries` builds the lists from
    the pool's location map and SGLang's `req_to_token` (held tokens only, grouped by
    tier: staging, then low-bit, then guard, each in position order), and each
    request's tier boundaries `tier_indptr[b]` = (staging, low-bit, guard start, end);
  * the layer's tables: staging (bf16 DenseStore), low-bit (PackedStore, K and V formats
    may differ) and guard (bf16 DenseStore, or an 8-bit PackedStore);
  * queries [B, Hq, D], already rotated like the stored keys.
Decode needs no positions: every stored token precedes the query.

Split-K flash decoding, two launches:
  1. `_decode_split_kernel`, grid (request, kv_head, split). A split owns a contiguous
     run of whole BLOCK_N-entry blocks of its request. Per block it loads the entries'
     tier and row, loads each row's K for its KV head from the entry's tier (dense bf16,
     or codes + fp16 (scale, minimum) dequantized in registers; every tier under its own
     mask), computes the logits of all query heads of the GQA group at once (the group
     padded to BLOCK_G rows, 16 unless `block_g` says 8, padding rows masked), updates the online
     softmax, and only then loads V the same way and accumulates. It writes the split's
     normalized output and its log-sum-exp (base 2).
     v2, `_decode_split_kernel_v2` (the default when the builders' `tier_indptr` is
     passed): the same split ranges, cut into one loop per tier (staging, low-bit,
     guard), each with only its own loader; no per-entry tier is read.
     v4, `_decode_split_kernel_v4` (what the engine runs for most formats,
     `engine.decode_kernel`): v2's ranges and loops, with packed rows dequantized after the
     dots (raw codes into the dots; scales and minimums applied to the logits and
     probabilities) and the output kept in column slices of the value group size; v5 (the
     engine's for the tuned configs' K4V2 g64) is the same kernel with the packed loops'
     tiles transposed onto Hopper's wgmma.
  2. `_merge_splits_kernel`, grid (request, q_head): log-sum-exp weighted sum of splits.
Empty splits (and requests with no entries) carry lse = -inf and weight 0; a request
with no entries gets an output of 0. Design notes, bytes per token and versions:
docs/kernels.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang_kvc.device_copy import to_device
from sglang_kvc.quant import PackedFormat

# Location encoding of sglang_kvc.pool (`location = row << TIER_BITS | tier`), mirrored
# here so that importing the kernels does not import SGLang; a test checks they agree.
TIER_BITS = 3
TIER_EMPTY, TIER_STAGING, TIER_LOWBIT, TIER_GUARD, TIER_EVICTED = 0, 1, 2, 3, 4
HELD_TIERS = (TIER_STAGING, TIER_LOWBIT, TIER_GUARD)  # entry order within a request

_TIER_MASK = tl.constexpr((1 << TIER_BITS) - 1)
_TIER_BITS = tl.constexpr(TIER_BITS)
_STAGING = tl.constexpr(TIER_STAGING)
_LOWBIT = tl.constexpr(TIER_LOWBIT)
_GUARD = tl.constexpr(TIER_GUARD)

# Read once, as Triton reads it: whether the kernels run in Triton's interpreter (see _round_to_bf16).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# fp16 1024 in both halves of a 32-bit word: OR-ed onto a code pair it gives 1024 + code in each
# half (exact). The v4 kernel takes it as an argument too (`bias_register`, see _biased_codes).
CODE_BIAS = 0x64006400
_CODE_BIAS = tl.constexpr(CODE_BIAS)
# fp16's explicit mantissa bits: below 1024 + 1024 the ulp is 1, so 1024 + code * 2^p is exact
# while the code's top bit stays below bit 10 (in-place value codes, _biased_codes).
_MANTISSA_BITS = tl.constexpr(10)

_LOG2_E = 1.4426950408889634
_OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- layer tables ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseTables:
    """One layer of a DenseStore: bf16 K and V, [rows, kv_heads, head_dim] each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def of(cls, store, layer: int) -> "DenseTables":
        return cls(store.k[layer], store.v[layer])

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1]


@dataclass(frozen=True)
class PackedTables:
    """One layer of a PackedStore: codes [rows, kv_heads, words] int32 and
    (scale, minimum) [rows, kv_heads, groups, 2] fp16, for K and for V."""

    k_codes: torch.Tensor
    k_scale_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale_min: torch.Tensor
    key_format: PackedFormat
    value_format: PackedFormat

    @classmethod
    def of(cls, store, layer: int) -> "PackedTables":
        return cls(
            store.k_codes[layer],
            store.k_scale_min[layer],
            store.v_codes[layer],
            store.v_scale_min[layer],
            store.key_format,
            store.value_format,
        )

    @property
    def head_dim(self) -> int:
        return self.key_format.head_dim


def layer_tables(pool, layer: int) -> tuple[DenseTables, PackedTables, DenseTables | PackedTables]:
    """(staging, low-bit, guard) tables of one layer of a CompressedKVPool."""
    guard = pool.guard
    guard_tables = DenseTables.of(guard, layer) if hasattr(guard, "k") else PackedTables.of(guard, layer)
    return DenseTables.of(pool.staging, layer), PackedTables.of(pool.lowbit, layer), guard_tables


# ---- entry lists -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeEntries:
    """Request b's held tokens are entries `indptr[b] : indptr[b + 1]` of `tier`/`row`
    (grouped by tier: staging, low-bit, guard; position order within a tier). The
    arrays have `capacity` slots; those past `indptr[-1]` are unspecified.

    `tier_indptr[b]` = (staging start, low-bit start, guard start, end) of request b in
    the same entry index space: its tier t (0 staging, 1 low-bit, 2 guard) owns entries
    `tier_indptr[b, t] : tier_indptr[b, t + 1]`, and `tier_indptr[:, 0]` / `[:, 3]` are
    `indptr[:-1]` / `indptr[1:]`. The v2 kernel loops over these ranges."""

    indptr: torch.Tensor  # [B + 1] int32
    tier: torch.Tensor  # [capacity] int8
    row: torch.Tensor  # [capacity] int32
    tier_indptr: torch.Tensor  # [B, 4] int32


def _tier_indptr(indptr: torch.Tensor, tier_counts: torch.Tensor) -> torch.Tensor:
    """[..., B, 4] int32 tier boundaries from indptr [..., B + 1] and held tokens per tier [..., B, 3]."""
    tier_indptr = torch.empty((*tier_counts.shape[:-1], 4), dtype=torch.int32, device=indptr.device)
    tier_indptr[..., 0] = indptr[..., :-1]
    tier_indptr[..., 1:] = indptr[..., :-1, None] + tier_counts.cumsum(-1)
    return tier_indptr


def _entry_shapes(req_pool_indices, seq_lens, max_seq_len, max_entries) -> tuple[int, int]:
    batch = req_pool_indices.numel()
    if max_seq_len is None:  # a device sync; SGLang knows it on the host (seq_lens_cpu)
        max_seq_len = int(seq_lens.max()) if batch else 0
    if max_entries is None:
        max_entries = batch * max_seq_len
    return max_seq_len, max_entries


def decode_entries_torch(
    location: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None = None,
    max_entries: int | None = None,
) -> DecodeEntries:
    """Entry lists of a decode batch in one vectorized torch pass (no loop over requests,
    no device sync when `max_seq_len` is given).

    location: [tokens + 1] int32, one layer of `pool.location`; req_to_token: SGLang's
    [max_reqs, max_context] table; seq_lens: [B]. `max_entries` bounds the total entry
    count (sum(seq_lens), SGLang's `seq_lens_sum`, is tight); default B * max_seq_len."""
    device = location.device
    batch = req_pool_indices.numel()
    max_seq_len, max_entries = _entry_shapes(req_pool_indices, seq_lens, max_seq_len, max_entries)
    positions = torch.arange(max_seq_len, device=device)
    in_sequence = positions[None, :] < seq_lens.to(device)[:, None]  # [B, L]
    tokens = req_to_token[req_pool_indices.to(torch.int64)[:, None], positions[None, :]]
    tokens = torch.where(in_sequence, tokens.to(torch.int64), 0)
    locations = location[tokens]
    tiers = locations & ((1 << TIER_BITS) - 1)
    rows = locations >> TIER_BITS

    held_tiers = torch.tensor(HELD_TIERS, device=device, dtype=tiers.dtype)
    in_tier = (in_sequence[..., None] & (tiers[..., None] == held_tiers)).to(torch.int32)  # [B, L, 3]
    rank_in_tier = in_tier.cumsum(1) - in_tier  # exclusive: keeps position order
    tier_counts = in_tier.sum(1)  # [B, 3]
    indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    indptr[1:] = tier_counts.sum(1).cumsum(0)
    tier_start = indptr[:-1, None] + tier_counts.cumsum(1) - tier_counts  # [B, 3]
    # One-hot select of the entry's own tier; tokens held nowhere go to a dummy slot.
    destination = ((tier_start[:, None, :] + rank_in_tier) * in_tier).sum(-1)
    destination = torch.where(in_tier.sum(-1) > 0, destination, max_entries).view(-1)

    entry_tier = torch.zeros(max_entries + 1, dtype=torch.int8, device=device)
    entry_row = torch.zeros(max_entries + 1, dtype=torch.int32, device=device)
    entry_tier[destination] = tiers.view(-1).to(torch.int8)
    entry_row[destination] = rows.view(-1).to(torch.int32)
    return DecodeEntries(indptr, entry_tier[:max_entries], entry_row[:max_entries],
                         _tier_indptr(indptr, tier_counts))


@triton.jit
def _block_locations(
    location_ptr, req_to_token_ptr, req_pool_indices_ptr, seq_lens_ptr, stride_req_to_token, request, block, BLOCK: tl.constexpr
):
    """Location words of one BLOCK of a request's positions (0 past its length)."""
    seq_len = tl.load(seq_lens_ptr + request)
    req_slot = tl.load(req_pool_indices_ptr + request).to(tl.int64)
    positions = block * BLOCK + tl.arange(0, BLOCK)
    in_sequence = positions < seq_len
    tokens = tl.load(req_to_token_ptr + req_slot * stride_req_to_token + positions, mask=in_sequence, other=0)
    locations = tl.load(location_ptr + tokens.to(tl.int64), mask=in_sequence, other=0)
    return in_sequence, locations


# The entry builders' block and request counts and location rows vary with the batch and
# the layer; one compiled variant for all of them (Triton would otherwise specialize on a
# count of 1, on multiples of 16 and on each layer row's alignment, compiling in the middle
# of requests).
_ENTRY_BUILDER_JIT = {"do_not_specialize": ["num_blocks", "batch"], "do_not_specialize_on_alignment": ["location_ptr"]}
# The scatter also offsets each layer's entries by the arrays' layer stride.
_SCATTER_JIT = {"do_not_specialize": ["num_blocks", "batch", "stride_entries_layer"],
                "do_not_specialize_on_alignment": ["location_ptr"]}
# Likewise the split count of the attention kernels and the partial outputs' strides, which
# follow it: the eager path picks the count per batch (a batch larger than the captured
# CUDA graphs met a new variant and waited ~3 s for its compile on the H200, serving run 26).
_ATTENTION_JIT = {"do_not_specialize": ["num_splits", "stride_po_batch", "stride_po_head",
                                        "stride_pl_batch", "stride_pl_head"]}
_MERGE_SPLITS_PER_STEP = 16
_SCATTER_BLOCKS_PER_STEP = 32  # block counts summed at once (1024-token blocks: 32K tokens)


@triton.jit(**_ENTRY_BUILDER_JIT)
def _count_held_kernel(
    location_ptr,  # [layers, tokens] location words
    req_to_token_ptr,
    req_pool_indices_ptr,
    seq_lens_ptr,
    block_counts_ptr,  # [layers, B, num_blocks, 3] int32, zeroed: held tokens per tier in each block
    stride_location_layer,
    stride_req_to_token,
    num_layers,
    batch,
    num_blocks,
    BLOCK: tl.constexpr,
    LAYERS_PER_STEP: tl.constexpr,
):
    """Grid (request, block of BLOCK positions). The block's token ids are read once, then
    its location words LAYERS_PER_STEP layers at a time: a decode step counts every layer in
    one launch (the map does not change during the pass; `stage` wrote the new tokens'
    words before it). Blocks past the request's length leave their zeros."""
    request = tl.program_id(0)
    block = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + request)
    if block * BLOCK >= seq_len:
        return
    req_slot = tl.load(req_pool_indices_ptr + request).to(tl.int64)
    positions = block * BLOCK + tl.arange(0, BLOCK)
    in_sequence = positions < seq_len
    tokens = tl.load(req_to_token_ptr + req_slot * stride_req_to_token + positions, mask=in_sequence, other=0)
    tokens = tokens.to(tl.int64)
    for first_layer in range(0, num_layers, LAYERS_PER_STEP):
        layers = first_layer + tl.arange(0, LAYERS_PER_STEP)
        in_layers = layers < num_layers
        held_mask = in_layers[:, None] & in_sequence[None, :]
        locations = tl.load(location_ptr + layers.to(tl.int64)[:, None] * stride_location_layer + tokens[None, :],
                            mask=held_mask, other=0)
        tiers = locations & _TIER_MASK
        counts_of_block = block_counts_ptr + ((layers.to(tl.int64) * batch + request) * num_blocks + block) * 3
        for tier_index in tl.static_range(3):
            counts = tl.sum((held_mask & (tiers == tier_index + _STAGING)).to(tl.int32), axis=1)
            tl.store(counts_of_block + tier_index, counts, mask=in_layers)


@triton.jit(**_SCATTER_JIT)
def _scatter_entries_kernel(
    location_ptr,  # [layers, tokens] location words
    req_to_token_ptr,
    req_pool_indices_ptr,
    seq_lens_ptr,
    block_offsets_ptr,  # [layers, B, num_blocks, 3] int32: first entry of each (block, tier), per layer
    entry_tier_ptr,  # [layers, max_entries], layer stride stride_entries_layer
    entry_row_ptr,  # [layers, max_entries], the same layer stride
    stride_location_layer,
    stride_req_to_token,
    batch,
    num_blocks,
    stride_entries_layer,
    BLOCK: tl.constexpr,
):
    """Grid (request, block of BLOCK positions, layer)."""
    request = tl.program_id(0)
    block = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    in_sequence, locations = _block_locations(
        location_ptr + layer * stride_location_layer, req_to_token_ptr, req_pool_indices_ptr, seq_lens_ptr,
        stride_req_to_token, request, block, BLOCK
    )
    tiers = locations & _TIER_MASK
    rows = locations >> _TIER_BITS
    offsets_of_block = block_offsets_ptr + ((layer * batch + request) * num_blocks + block) * 3
    layer_tier_ptr = entry_tier_ptr + layer * stride_entries_layer
    layer_row_ptr = entry_row_ptr + layer * stride_entries_layer
    for tier_index in tl.static_range(3):
        tier = tier_index + _STAGING
        selected = (in_sequence & (tiers == tier)).to(tl.int32)
        rank = tl.cumsum(selected, axis=0) - selected  # exclusive: keeps position order
        destination = tl.load(offsets_of_block + tier_index) + rank
        tl.store(layer_tier_ptr + destination, tiers.to(tl.int8), mask=selected > 0)
        tl.store(layer_row_ptr + destination, rows, mask=selected > 0)


def held_per_block(location, req_to_token, req_pool_indices, seq_lens, max_seq_len: int,
                   block: int = 1024) -> torch.Tensor:
    """[layers, B, blocks, 3] int32: held tokens per tier in each block of `block` positions
    of every request, for every layer of `location` ([layers, tokens], or one layer's
    [tokens]: then [B, blocks, 3]). One launch; the builders' first step, which a decode
    pass takes once for all its layers (`decode_entries_in_regions(block_counts=...)`)."""
    one_layer = location.dim() == 1
    if one_layer:
        location = location.unsqueeze(0)
    if location.stride(-1) != 1 or req_to_token.stride(-1) != 1:
        raise ValueError("location and req_to_token rows must be contiguous")
    batch = req_pool_indices.numel()
    grid = (batch, max(1, triton.cdiv(max_seq_len, block)))
    block_counts = torch.zeros((location.shape[0], *grid, 3), dtype=torch.int32, device=location.device)
    if batch:
        _count_held_kernel[grid](
            location, req_to_token, req_pool_indices.to(location.device),
            seq_lens.to(device=location.device, dtype=torch.int32), block_counts,
            location.stride(0), req_to_token.stride(0), location.shape[0], batch, grid[1],
            BLOCK=block, LAYERS_PER_STEP=_COUNT_LAYERS_PER_STEP,
        )
    return block_counts[0] if one_layer else block_counts


# Location words of 4 layers x 1024 positions per step of the count loop (32 registers per
# thread of them at 4 warps; the kernel compiles for sm_90 at 165, no spills:
# docs/results/compile-kernels-2026-11-30.md).
_COUNT_LAYERS_PER_STEP = 4


def decode_entries(
    location: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None = None,
    max_entries: int | None = None,
    block: int = 1024,
) -> DecodeEntries:
    """Same lists as `decode_entries_torch`, built by two Triton launches over
    (request, block of positions): count held tokens per tier, then scatter them. Each
    pass reads req_to_token and location once (8 bytes per logical token); the glue
    between them works on [B, blocks, 3] counts only.

    `location` is one layer's [tokens] words, or [layers, tokens]: then every layer's lists
    come from the same two launches and one glue pass, each array with a leading layer axis
    (indptr [layers, B + 1], tier / row [layers, max_entries], tier_indptr [layers, B, 4];
    `layer_entries` takes one layer's). An extend pass over a cached prefix builds them so,
    once for all its layers: per layer, the glue's ~25 operators made a one-token extend on a
    cached 512-token prompt host-bound (serving run 33)."""
    one_layer = location.dim() == 1
    if one_layer:
        location = location.unsqueeze(0)
    device = location.device
    layers, batch = location.shape[0], req_pool_indices.numel()
    max_seq_len, max_entries = _entry_shapes(req_pool_indices, seq_lens, max_seq_len, max_entries)
    # Every layer's rows start 16-byte aligned, as a one-layer build's do: Triton compiles a
    # kernel again for each new pointer alignment (ours, and SGLang's extend kernel, which
    # takes indptr), so unaligned layer rows compiled three variants in the middle of a
    # request (1.9 s, serving run 34).
    indptr = torch.zeros((layers, _round_up(batch + 1, 4)), dtype=torch.int32, device=device)[:, : batch + 1]
    entry_tier = torch.zeros((layers, _round_up(max_entries, 16)), dtype=torch.int8, device=device)[:, :max_entries]
    entry_row = torch.zeros((layers, _round_up(max_entries, 16)), dtype=torch.int32, device=device)[:, :max_entries]
    num_blocks = triton.cdiv(max_seq_len, block)
    if batch == 0 or num_blocks == 0:
        tier_indptr = torch.zeros((layers, batch, 4), dtype=torch.int32, device=device)
        entries = DecodeEntries(indptr, entry_tier, entry_row, tier_indptr)
        return layer_entries(entries, 0) if one_layer else entries
    if req_to_token.stride(-1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    seq_lens = seq_lens.to(device=device, dtype=torch.int32)
    req_pool_indices = req_pool_indices.to(device)
    block_counts = held_per_block(location, req_to_token, req_pool_indices, seq_lens, max_seq_len, block)
    tier_counts = block_counts.sum(2)  # [layers, B, 3]
    indptr[:, 1:] = tier_counts.sum(2).cumsum(1)
    tier_start = indptr[:, :-1, None] + tier_counts.cumsum(2) - tier_counts
    block_offsets = (tier_start[:, :, None, :] + block_counts.cumsum(2) - block_counts).to(torch.int32)
    _scatter_entries_kernel[(batch, num_blocks, layers)](
        location, req_to_token, req_pool_indices, seq_lens, block_offsets.contiguous(), entry_tier, entry_row,
        location.stride(0), req_to_token.stride(0), batch, num_blocks, entry_row.stride(0), BLOCK=block,
    )
    entries = DecodeEntries(indptr, entry_tier, entry_row, _tier_indptr(indptr, tier_counts))
    return layer_entries(entries, 0) if one_layer else entries


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def layer_entries(entries: DecodeEntries, layer: int) -> DecodeEntries:
    """One layer's lists (views) of a multi-layer `decode_entries` result."""
    return DecodeEntries(entries.indptr[layer], entries.tier[layer], entries.row[layer], entries.tier_indptr[layer])


@triton.jit
def _scatter_tier_block(entry_tier_ptr, entry_row_ptr, in_sequence, tiers, rows, tier, first):
    """Entries `first`, `first + 1`, ... get this block's held tokens of `tier`, in position order."""
    selected = (in_sequence & (tiers == tier)).to(tl.int32)
    rank = tl.cumsum(selected, axis=0) - selected  # exclusive
    tl.store(entry_tier_ptr + first + rank, tiers.to(tl.int8), mask=selected > 0)
    tl.store(entry_row_ptr + first + rank, rows, mask=selected > 0)


@triton.jit(**_ENTRY_BUILDER_JIT)
def _region_scatter_kernel(
    location_ptr,
    req_to_token_ptr,
    req_pool_indices_ptr,
    seq_lens_ptr,
    region_indptr_ptr,  # [B + 1]: request b's region starts at region_indptr[b], seq_lens[b] slots
    block_counts_ptr,  # [B, num_blocks, 3] int32 from _count_held_kernel (one layer's)
    entry_tier_ptr,
    entry_row_ptr,
    tier_indptr_ptr,  # [B, 4] out
    stride_req_to_token,
    num_blocks,
    BLOCK: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    """Grid (request, block of BLOCK positions). Each program finds where its block's held
    tokens go from the per-block counts of its request (summed BLOCKS_PER_STEP blocks at a
    time, no separate scan launch), scatters them tier-grouped from the region's start,
    and marks EMPTY the region slots of its block's range past the request's entries (so
    that v1, which walks whole regions, skips them). Block 0 writes the tier ranges."""
    request = tl.program_id(0)
    block = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + request)
    if block > 0 and block * BLOCK >= seq_len:
        return  # past the request: nothing to place, no region slot to mark
    region_start = tl.load(region_indptr_ptr + request)
    counts_row = block_counts_ptr + request.to(tl.int64) * num_blocks * 3
    # Per tier: the request's total, and the part in blocks before this one.
    staging_total = tl.zeros([], dtype=tl.int32)
    lowbit_total = tl.zeros([], dtype=tl.int32)
    guard_total = tl.zeros([], dtype=tl.int32)
    staging_before = tl.zeros([], dtype=tl.int32)
    lowbit_before = tl.zeros([], dtype=tl.int32)
    guard_before = tl.zeros([], dtype=tl.int32)
    for first in range(0, num_blocks, BLOCKS_PER_STEP):
        offs_block = first + tl.arange(0, BLOCKS_PER_STEP)
        counted = offs_block < num_blocks
        earlier = offs_block < block
        staging = tl.load(counts_row + offs_block * 3 + 0, mask=counted, other=0)
        lowbit = tl.load(counts_row + offs_block * 3 + 1, mask=counted, other=0)
        guard = tl.load(counts_row + offs_block * 3 + 2, mask=counted, other=0)
        staging_total += tl.sum(staging, axis=0)
        lowbit_total += tl.sum(lowbit, axis=0)
        guard_total += tl.sum(guard, axis=0)
        staging_before += tl.sum(tl.where(earlier, staging, 0), axis=0)
        lowbit_before += tl.sum(tl.where(earlier, lowbit, 0), axis=0)
        guard_before += tl.sum(tl.where(earlier, guard, 0), axis=0)
    staging_start = region_start
    lowbit_start = staging_start + staging_total
    guard_start = lowbit_start + lowbit_total
    entries_end = guard_start + guard_total
    if block == 0:
        tl.store(tier_indptr_ptr + request * 4 + 0, staging_start)
        tl.store(tier_indptr_ptr + request * 4 + 1, lowbit_start)
        tl.store(tier_indptr_ptr + request * 4 + 2, guard_start)
        tl.store(tier_indptr_ptr + request * 4 + 3, entries_end)

    in_sequence, locations = _block_locations(location_ptr, req_to_token_ptr, req_pool_indices_ptr, seq_lens_ptr,
                                              stride_req_to_token, request, block, BLOCK)
    tiers = locations & _TIER_MASK
    rows = locations >> _TIER_BITS
    _scatter_tier_block(entry_tier_ptr, entry_row_ptr, in_sequence, tiers, rows, _STAGING,
                        staging_start + staging_before)
    _scatter_tier_block(entry_tier_ptr, entry_row_ptr, in_sequence, tiers, rows, _STAGING + 1,
                        lowbit_start + lowbit_before)
    _scatter_tier_block(entry_tier_ptr, entry_row_ptr, in_sequence, tiers, rows, _STAGING + 2,
                        guard_start + guard_before)

    slots = region_start + block * BLOCK + tl.arange(0, BLOCK)
    in_tail = (slots >= entries_end) & (slots < region_start + seq_len)
    tl.store(entry_tier_ptr + slots, tl.zeros([BLOCK], dtype=tl.int8), mask=in_tail)
    tl.store(entry_row_ptr + slots, tl.zeros([BLOCK], dtype=tl.int32), mask=in_tail)


def region_indptr_for(seq_lens: list[int], device) -> torch.Tensor:
    """[B + 1] int32 exclusive prefix sum of the host-side sequence lengths: each request's
    region of entry slots (its held tokens fit: held <= seq_len). Once per decode step."""
    bounds = [0]
    for seq_len in seq_lens:
        bounds.append(bounds[-1] + seq_len)
    return to_device(bounds, torch.int32, device)


def decode_entries_in_regions(
    location: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    region_indptr: torch.Tensor,
    capacity: int,
    max_seq_len: int,
    block: int = 1024,
    block_counts: torch.Tensor | None = None,
) -> DecodeEntries:
    """The entry lists of one layer in two launches over (request, block of positions) and
    no host glue, so it can be recorded into a CUDA graph: count held tokens per tier and
    block, then place them (each program scans its request's block counts itself).
    `block_counts`: this layer's counts [B, blocks, 3] from a `held_per_block` of all
    layers at once (same `max_seq_len` and `block`); then the layer's build is one launch.

    Request b owns the fixed region `region_indptr[b] :` + seq_lens[b] of the entry arrays
    (`capacity` slots in all; eager: `region_indptr_for`, regions back to back; CUDA graph:
    one region of context_len slots per request slot): its held tokens come first,
    tier-grouped as `tier_indptr[b]` says, the rest of its seq_len slots are EMPTY. So
    `indptr` = `region_indptr` also serves v1 (which skips EMPTY entries, at the cost of
    walking whole regions); v2 reads `tier_indptr` only. `max_seq_len` bounds the grid
    (programs past a request's length return at once): the batch's longest sequence, or
    the context length in a graph."""
    device = location.device
    batch = req_pool_indices.numel()
    entry_tier = torch.empty(capacity, dtype=torch.int8, device=device)
    entry_row = torch.empty(capacity, dtype=torch.int32, device=device)
    tier_indptr = torch.empty((batch, 4), dtype=torch.int32, device=device)
    if region_indptr.shape != (batch + 1,):
        raise ValueError(f"region_indptr must be [{batch + 1}], got {tuple(region_indptr.shape)}")
    if batch == 0:
        return DecodeEntries(region_indptr, entry_tier, entry_row, tier_indptr)
    if req_to_token.stride(-1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    num_blocks = max(1, triton.cdiv(max_seq_len, block))
    seq_lens = seq_lens.to(device=device, dtype=torch.int32)
    req_pool_indices = req_pool_indices.to(device)
    grid = (batch, num_blocks)
    if block_counts is None:
        block_counts = held_per_block(location, req_to_token, req_pool_indices, seq_lens, max_seq_len, block)
    elif block_counts.shape != (*grid, 3):
        raise ValueError(f"block_counts must be [{batch}, {num_blocks}, 3] for max_seq_len {max_seq_len} "
                         f"in blocks of {block}, got {tuple(block_counts.shape)}")
    _region_scatter_kernel[grid](
        location, req_to_token, req_pool_indices, seq_lens, region_indptr, block_counts,
        entry_tier, entry_row, tier_indptr, req_to_token.stride(0), num_blocks,
        BLOCK=block, BLOCKS_PER_STEP=_SCATTER_BLOCKS_PER_STEP,
    )
    return DecodeEntries(region_indptr, entry_tier, entry_row, tier_indptr)


# ---- attention kernels ---------------------------------------------------------------------------
@triton.jit
def _load_dense_rows(table_ptr, rows, kv_head, stride_row, stride_head, in_tier, dims, dim_mask):
    """[BLOCK_N, BLOCK_D] of bf16 rows as stored; 0 where `in_tier` is false (the entry is of
    another tier, or past the end of the block's range)."""
    ptrs = table_ptr + rows[:, None] * stride_row + kv_head * stride_head + dims[None, :]
    return tl.load(ptrs, mask=in_tier[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def _load_dense_tile(table_ptr, rows, kv_head, stride_row, stride_head, in_tier, dims, dim_mask):
    """`_load_dense_rows` in fp32."""
    return _load_dense_rows(table_ptr, rows, kv_head, stride_row, stride_head, in_tier, dims, dim_mask).to(tl.float32)


@triton.jit
def _load_dense_operand(table_ptr, rows, kv_head, stride_row, stride_head, in_tier, dims, dim_mask,
                        DOT_PRECISION: tl.constexpr):
    """A bf16 tier's tile as a dot operand: bf16 as stored for "bf16" dots (no conversion, so
    the compiler may copy the rows straight to shared memory), else fp32."""
    if DOT_PRECISION == "bf16":
        return _load_dense_rows(table_ptr, rows, kv_head, stride_row, stride_head, in_tier, dims, dim_mask)
    else:
        return _load_dense_tile(table_ptr, rows, kv_head, stride_row, stride_head, in_tier, dims, dim_mask)


@triton.jit
def _load_packed_words(
    codes_ptr,
    pairs_ptr,  # the fp16 (scale, minimum) pairs, viewed as one int32 each
    rows,
    kv_head,
    stride_codes_row,
    stride_codes_head,
    stride_pairs_row,
    stride_pairs_head,
    in_tier,
    dims,
    dim_mask,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The packed words and (scale, minimum) pairs of a block of rows, as stored (0 where the
    entry is not in this tier): [BLOCK_N, BLOCK_D / codes per word] words for 2/4/8 bits,
    one word per channel [BLOCK_N, BLOCK_D] for 3 bits; [BLOCK_N, BLOCK_D / GROUP_SIZE]
    pairs. Loading apart from `_unpack_tile` lets a loop fetch the next block's few packed
    registers while it computes on this one."""
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    row_mask = in_tier[:, None]
    codes_base = codes_ptr + rows[:, None] * stride_codes_row + kv_head * stride_codes_head
    if BITS != 3:
        # 2/4/8 bits: a power-of-two number of codes per word, so the row's words load as
        # one contiguous run.
        WORDS: tl.constexpr = (HEAD_DIM + CODES_PER_WORD - 1) // CODES_PER_WORD
        BLOCK_WORDS: tl.constexpr = BLOCK_D // CODES_PER_WORD
        offs_word = tl.arange(0, BLOCK_WORDS)
        words = tl.load(codes_base + offs_word[None, :], mask=row_mask & (offs_word < WORDS)[None, :], other=0)
    else:
        # 3 bits: 10 codes per word, so words straddle groups and dims do not map to
        # (word, slot) by a reshape. Every lane loads its own word; lanes of one word
        # load one address, which the cache serves once.
        words = tl.load(codes_base + (dims // CODES_PER_WORD)[None, :], mask=row_mask & dim_mask[None, :], other=0)
    # One pair per group: group sizes are powers of two that divide head_dim, so they
    # divide BLOCK_D too.
    GROUPS: tl.constexpr = HEAD_DIM // GROUP_SIZE
    offs_group = tl.arange(0, BLOCK_D // GROUP_SIZE)
    pair_ptrs = pairs_ptr + rows[:, None] * stride_pairs_row + kv_head * stride_pairs_head + offs_group[None, :]
    pairs = tl.load(pair_ptrs, mask=row_mask & (offs_group < GROUPS)[None, :], other=0)
    return words, pairs


@triton.jit
def _unpack_tile(
    words,
    pairs,
    dims,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_N, BLOCK_D] fp32 dequantized rows (code * scale + minimum, as quant.dequantize)
    from `_load_packed_words`; 0 where the words and pairs were masked off.

    Written for instruction count: conversions run at a quarter of the FMA rate on sm_90,
    so the pairs are converted once per group before they are broadcast over its channels,
    and codes become floats by the exponent trick (OR into 2^23's bit pattern, subtract
    2^23: exact for codes < 2^23) instead of an int-to-float conversion per element."""
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    MAX_CODE: tl.constexpr = (1 << BITS) - 1
    if BITS != 3:
        # [n, word, slot] -> dim word * CODES_PER_WORD + slot is a reshape. Arithmetic
        # shift of the signed word is fine: the mask drops the sign bits.
        shifts = tl.arange(0, CODES_PER_WORD) * BITS
        codes = (words[:, :, None] >> shifts[None, None, :]) & MAX_CODE
        codes = tl.reshape(codes, [BLOCK_N, BLOCK_D])
    else:
        codes = (words >> ((dims % CODES_PER_WORD) * BITS)[None, :]) & MAX_CODE
    values = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + code, minus 2^23

    BLOCK_GROUPS: tl.constexpr = BLOCK_D // GROUP_SIZE
    # Little-endian: the scale is the low half of the pair, the minimum the high half.
    scale = pairs.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    minimum = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_N, BLOCK_GROUPS, GROUP_SIZE]), [BLOCK_N, BLOCK_D])
    minimum = tl.reshape(tl.broadcast_to(minimum[:, :, None], [BLOCK_N, BLOCK_GROUPS, GROUP_SIZE]),
                         [BLOCK_N, BLOCK_D])
    return values * scale + minimum


@triton.jit
def _load_packed_tile(
    codes_ptr,
    pairs_ptr,
    rows,
    kv_head,
    stride_codes_row,
    stride_codes_head,
    stride_pairs_row,
    stride_pairs_head,
    in_tier,
    dims,
    dim_mask,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_N, BLOCK_D] fp32 dequantized rows; 0 where the entry is not in this tier."""
    words, pairs = _load_packed_words(codes_ptr, pairs_ptr, rows, kv_head, stride_codes_row, stride_codes_head,
                                      stride_pairs_row, stride_pairs_head, in_tier, dims, dim_mask,
                                      HEAD_DIM, BITS, GROUP_SIZE, BLOCK_N, BLOCK_D)
    return _unpack_tile(words, pairs, dims, BITS, GROUP_SIZE, BLOCK_N, BLOCK_D)


@triton.jit
def _load_tile(
    rows,
    kv_head,
    is_staging,
    is_lowbit,
    is_guard,
    dims,
    dim_mask,
    staging_ptr,
    stride_staging_row,
    stride_staging_head,
    lowbit_codes_ptr,
    lowbit_pairs_ptr,
    stride_lowbit_row,
    stride_lowbit_head,
    stride_lowbit_pairs_row,
    stride_lowbit_pairs_head,
    guard_ptr,  # bf16 rows, or codes when GUARD_PACKED
    guard_pairs_ptr,
    stride_guard_row,
    stride_guard_head,
    stride_guard_pairs_row,
    stride_guard_pairs_head,
    LOWBIT_BITS: tl.constexpr,
    LOWBIT_GROUP_SIZE: tl.constexpr,
    GUARD_PACKED: tl.constexpr,
    GUARD_BITS: tl.constexpr,
    GUARD_GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The K (or V) rows of one block of entries, each read from its own tier, as fp32
    [BLOCK_N, BLOCK_D]; 0 for entries in no held tier.

    Every tier is loaded under its mask, without branching on which tiers the block
    holds: masked-off lanes read no memory, and branch-free loads are what the compiler
    software-pipelines (cp.async) across iterations of the block loop. (With per-tier
    `if`s the loads sat in branches, were not pipelined, and the kernel needed ~245
    registers against ~180: docs/kernels.md, Versions.)"""
    tile = _load_dense_tile(staging_ptr, rows, kv_head, stride_staging_row, stride_staging_head,
                            is_staging, dims, dim_mask)
    tile += _load_packed_tile(lowbit_codes_ptr, lowbit_pairs_ptr, rows, kv_head,
                              stride_lowbit_row, stride_lowbit_head, stride_lowbit_pairs_row,
                              stride_lowbit_pairs_head, is_lowbit, dims, dim_mask,
                              HEAD_DIM, LOWBIT_BITS, LOWBIT_GROUP_SIZE, BLOCK_N, BLOCK_D)
    if GUARD_PACKED:
        tile += _load_packed_tile(guard_ptr, guard_pairs_ptr, rows, kv_head,
                                  stride_guard_row, stride_guard_head, stride_guard_pairs_row,
                                  stride_guard_pairs_head, is_guard, dims, dim_mask,
                                  HEAD_DIM, GUARD_BITS, GUARD_GROUP_SIZE, BLOCK_N, BLOCK_D)
    else:
        tile += _load_dense_tile(guard_ptr, rows, kv_head, stride_guard_row, stride_guard_head,
                                 is_guard, dims, dim_mask)
    return tile


@triton.jit
def _round_to_bf16(x):
    """fp32 `x` rounded to the nearest bf16 (ties to even), kept in fp32. For the interpreter
    only: Triton 3.6's interpreter casts fp32 to bf16 by truncation and multiplies bf16 dot
    operands as their raw 16-bit patterns (InterpreterBuilder.create_dot)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """fp32 a @ b with fp32 accumulation. "fp16": operands rounded to fp16 (the precision
    of tf32 at half the registers; needs |values| < 65504, which the fp16 scales of the
    packed tiers assume anyway); "bf16": operands rounded to bf16 (bf16 rows exact; the
    query and the probabilities rounded as SGLang's own decode kernel rounds them);
    "tf32" / "ieee": tl.dot's input_precision."""
    if PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif PRECISION == "bf16":
        if _INTERPRETED:
            return tl.dot(_round_to_bf16(a.to(tl.float32)), _round_to_bf16(b.to(tl.float32)), input_precision="ieee")
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _split_range(entries_start, entries_end, split, num_splits, BLOCK_N: tl.constexpr):
    """[split_start, split_end) of a request's entries: a split owns whole BLOCK_N blocks;
    trailing splits may be empty."""
    entries_per_split = tl.cdiv(tl.cdiv(entries_end - entries_start, num_splits), BLOCK_N) * BLOCK_N
    split_start = entries_start + split * entries_per_split
    return split_start, tl.minimum(split_start + entries_per_split, entries_end)


@triton.jit
def _split_tier_ranges(tier_indptr_ptr, request, split, num_splits, stride_batch, stride_tier, BLOCK_N: tl.constexpr):
    """This split's share [first, end) of each tier of the request's entries (v2 / v4): staging,
    low-bit, guard. Every split takes its share of each tier, so the splits are balanced whatever
    the tiers cost per entry (bf16 guard rows take the tf32 loop; a tier at the end of one shared
    range would all land in the last splits, the kernel then waiting for them)."""
    bounds_ptr = tier_indptr_ptr + request.to(tl.int64) * stride_batch
    staging_start = tl.load(bounds_ptr)
    lowbit_start = tl.load(bounds_ptr + stride_tier)
    guard_start = tl.load(bounds_ptr + 2 * stride_tier)
    entries_end = tl.load(bounds_ptr + 3 * stride_tier)
    staging_first, staging_end = _split_range(staging_start, lowbit_start, split, num_splits, BLOCK_N)
    lowbit_first, lowbit_end = _split_range(lowbit_start, guard_start, split, num_splits, BLOCK_N)
    guard_first, guard_end = _split_range(guard_start, entries_end, split, num_splits, BLOCK_N)
    return staging_first, staging_end, lowbit_first, lowbit_end, guard_first, guard_end


@triton.jit
def _load_group_queries(q_ptr, request, kv_head, stride_q_batch, stride_q_head,
                        QUERY_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The queries of one KV head's GQA group, fp32 [BLOCK_G, BLOCK_D], with their head
    indices and the lane masks both split kernels need."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    group_mask = offs_g < QUERY_GROUP
    dim_mask = offs_d < HEAD_DIM
    q_heads = kv_head * QUERY_GROUP + offs_g
    q_ptrs = q_ptr + request.to(tl.int64) * stride_q_batch + q_heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=group_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
    return q, q_heads, offs_d, group_mask, dim_mask


@triton.jit(**_ATTENTION_JIT)
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    entries_indptr_ptr,  # [B + 1]
    entry_tier_ptr,  # [E]
    entry_row_ptr,  # [E]
    staging_k_ptr,  # [rows, Hkv, D] bf16 (V has the same strides)
    staging_v_ptr,
    lowbit_k_codes_ptr,  # [rows, Hkv, words] int32
    lowbit_k_pairs_ptr,  # [rows, Hkv, groups] int32 view of the fp16 (scale, minimum) pairs
    lowbit_v_codes_ptr,
    lowbit_v_pairs_ptr,
    guard_k_ptr,  # dense: [rows, Hkv, D] bf16; packed: codes (K and V share one format)
    guard_k_pairs_ptr,  # packed guard only
    guard_v_ptr,
    guard_v_pairs_ptr,
    partial_out_ptr,  # [B, Hq, splits, D] fp32
    partial_lse_ptr,  # [B, Hq, splits] fp32, base 2
    qk_scale,  # scaling * log2(e): logits are kept in base 2 (exp2)
    stride_q_batch,
    stride_q_head,
    stride_staging_row,
    stride_staging_head,
    stride_lk_row,
    stride_lk_head,
    stride_lk_pairs_row,
    stride_lk_pairs_head,
    stride_lv_row,
    stride_lv_head,
    stride_lv_pairs_row,
    stride_lv_pairs_head,
    stride_guard_row,
    stride_guard_head,
    stride_guard_pairs_row,
    stride_guard_pairs_head,
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
    QUERY_GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    num_splits,  # a runtime value (_ATTENTION_JIT), as are the partial strides: one variant for any count
    KEY_BITS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_GROUP_SIZE: tl.constexpr,
    GUARD_PACKED: tl.constexpr,
    GUARD_BITS: tl.constexpr,
    GUARD_GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    split_start, split_end = _split_range(tl.load(entries_indptr_ptr + request),
                                          tl.load(entries_indptr_ptr + request + 1), split, num_splits, BLOCK_N)
    q, q_heads, offs_d, group_mask, dim_mask = _load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, QUERY_GROUP, HEAD_DIM, BLOCK_G, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    for block_start in range(split_start, split_end, BLOCK_N):
        entries = block_start + offs_n
        entry_mask = entries < split_end
        tiers = tl.load(entry_tier_ptr + entries, mask=entry_mask, other=0)
        rows = tl.load(entry_row_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
        is_staging = entry_mask & (tiers == _STAGING)
        is_lowbit = entry_mask & (tiers == _LOWBIT)
        is_guard = entry_mask & (tiers == _GUARD)
        # Tiers other than these (EMPTY, EVICTED) hold nothing: masked like padding.
        held = is_staging | is_lowbit | is_guard

        # -- logits of every query head of the group against the block's keys
        k = _load_tile(rows, kv_head, is_staging, is_lowbit, is_guard, offs_d, dim_mask,
                       staging_k_ptr, stride_staging_row, stride_staging_head,
                       lowbit_k_codes_ptr, lowbit_k_pairs_ptr, stride_lk_row, stride_lk_head,
                       stride_lk_pairs_row, stride_lk_pairs_head,
                       guard_k_ptr, guard_k_pairs_ptr, stride_guard_row, stride_guard_head,
                       stride_guard_pairs_row, stride_guard_pairs_head,
                       KEY_BITS, KEY_GROUP_SIZE, GUARD_PACKED, GUARD_BITS, GUARD_GROUP_SIZE,
                       HEAD_DIM, BLOCK_N, BLOCK_D)
        logits = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        logits = tl.where(held[None, :], logits, float("-inf"))

        # -- online softmax
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        # While nothing is held yet m_new is -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(logits - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        # -- values, loaded after the softmax so K and V tiles need not be live together
        v = _load_tile(rows, kv_head, is_staging, is_lowbit, is_guard, offs_d, dim_mask,
                       staging_v_ptr, stride_staging_row, stride_staging_head,
                       lowbit_v_codes_ptr, lowbit_v_pairs_ptr, stride_lv_row, stride_lv_head,
                       stride_lv_pairs_row, stride_lv_pairs_head,
                       guard_v_ptr, guard_v_pairs_ptr, stride_guard_row, stride_guard_head,
                       stride_guard_pairs_row, stride_guard_pairs_head,
                       VALUE_BITS, VALUE_GROUP_SIZE, GUARD_PACKED, GUARD_BITS, GUARD_GROUP_SIZE,
                       HEAD_DIM, BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p, v, DOT_PRECISION)
        m_i = m_new

    _store_split_partial(partial_out_ptr, partial_lse_ptr, m_i, l_i, acc, request, q_heads, split, offs_d,
                         group_mask, dim_mask, stride_po_batch, stride_po_head, stride_po_split,
                         stride_pl_batch, stride_pl_head)


@triton.jit
def _store_split_partial(
    partial_out_ptr,
    partial_lse_ptr,
    m_i,
    l_i,
    acc,
    request,
    q_heads,
    split,
    offs_d,
    group_mask,
    dim_mask,
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
):
    """Writes the split's normalized output acc / l and its log-sum-exp m + log2 l (base 2);
    a split that saw no held entry writes output 0 and lse -inf (weight 0 in the merge)."""
    has_entries = l_i > 0
    safe_l = tl.where(has_entries, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(has_entries, m_i + tl.math.log2(safe_l), float("-inf"))
    out_ptrs = (
        partial_out_ptr
        + request.to(tl.int64) * stride_po_batch
        + q_heads[:, None] * stride_po_head
        + split * stride_po_split
        + offs_d[None, :]
    )
    tl.store(out_ptrs, out, mask=group_mask[:, None] & dim_mask[None, :])
    lse_ptrs = partial_lse_ptr + request.to(tl.int64) * stride_pl_batch + q_heads * stride_pl_head + split
    tl.store(lse_ptrs, lse, mask=group_mask)


@triton.jit
def _block_logits(q, k, valid, qk_scale, DOT_PRECISION: tl.constexpr):
    """Base-2 logits [BLOCK_G, BLOCK_N] of the group's queries against one block of keys;
    -inf for lanes past the end of the block's range."""
    logits = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
    return tl.where(valid[None, :], logits, float("-inf"))


@triton.jit
def _softmax_step(m_i, l_i, logits):
    """One block's online-softmax step: (m_new, l_new, p, alpha), acc to be scaled by alpha."""
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    # While nothing is held yet m_new is -inf: shift by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(logits - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return m_new, l_i * alpha + tl.sum(p, axis=1), p, alpha


@triton.jit
def _online_softmax_update(m_i, l_i, acc, logits, v, DOT_PRECISION: tl.constexpr):
    """Folds one block (its logits and V tile) into the running max m_i, the running sum
    l_i of exp2(logit - m_i) and the unnormalized output acc; returns (m_i, l_i, acc)."""
    m_new, l_i, p, alpha = _softmax_step(m_i, l_i, logits)
    return m_new, l_i, acc * alpha[:, None] + _dot(p, v, DOT_PRECISION)


@triton.jit
def _pair_halves(pairs):
    """fp16 (scale, minimum) of int32 pairs (little-endian: the scale is the low half)."""
    scale = pairs.to(tl.int16).to(tl.float16, bitcast=True)
    minimum = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return scale, minimum


@triton.jit
def _paired_biased_codes(containers, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """1024 + code (fp16, exact) of the codes at bit SHIFT of 16-bit containers, two
    containers per instruction: the mma operand layout holds adjacent containers in one
    32-bit register, so one shift and one LOP3 ((x & mask) | 0x6400 in both halves) give
    two fp16 values. PTX asm takes its shift and mask as literals, hence one branch each."""
    if BITS == 2 and SHIFT == 0:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00030003, 0x64006400, 0xea;", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 2 and SHIFT == 2:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 2; lop3.b32 $0, t, 0x00030003, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 2 and SHIFT == 4:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x00030003, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 2 and SHIFT == 6:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 6; lop3.b32 $0, t, 0x00030003, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 2 and SHIFT == 8:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x00030003, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 2 and SHIFT == 10:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 10; lop3.b32 $0, t, 0x00030003, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 2 and SHIFT == 12:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x00030003, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 2 and SHIFT == 14:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 14; lop3.b32 $0, t, 0x00030003, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 4 and SHIFT == 0:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000f000f, 0x64006400, 0xea;", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 4 and SHIFT == 4:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 4 and SHIFT == 8:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 4 and SHIFT == 12:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 8 and SHIFT == 0:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00ff00ff, 0x64006400, 0xea;", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    elif BITS == 8 and SHIFT == 8:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x00ff00ff, 0x64006400, 0xea; }", "=r,r", [containers], dtype=tl.float16,
                                         is_pure=True, pack=2)
    else:
        tl.static_assert(False, "codes of 2, 4 or 8 bits in 16-bit containers")


@triton.jit
def _slot_values(containers, scale, minimum, slot: tl.constexpr, BITS: tl.constexpr, PAIRED_ASM: tl.constexpr):
    """fp16 code * scale + minimum of one code slot of every 16-bit container: an
    elementwise function of the loaded tiles, so Triton loads the containers straight into
    the mma operand layout (no dequantized tile passes through shared memory).

    fp16 of a code by the exponent trick (1024's bit pattern OR the code is 1024 + code,
    exactly; subtract 1024), not an int-to-float conversion (quarter rate: with it the loop
    ran at half v2's speed, bench v10). PAIRED_ASM (compiled kernels) does it for two
    containers per instruction; the interpreter, which runs no PTX, one by one."""
    if PAIRED_ASM:
        biased = _paired_biased_codes(containers, slot * BITS, BITS)
    else:
        codes = (containers >> (slot * BITS)) & ((1 << BITS) - 1)
        biased = (codes | 0x6400).to(tl.float16, bitcast=True)
    return (biased - 1024.0) * scale + minimum


@triton.jit
def _lowbit_register_operand_loop(
    q_ptr,
    request,
    kv_head,
    stride_q_batch,
    stride_q_head,
    entry_row_ptr,
    first,
    end,
    k_containers_ptr,  # the low-bit K codes viewed as containers of KEY_SLOTS codes each
    k_pairs_ptr,
    stride_kc_row,
    stride_kc_head,
    stride_kp_row,
    stride_kp_head,
    v_containers_ptr,
    v_pairs_ptr,
    stride_vc_row,
    stride_vc_head,
    stride_vp_row,
    stride_vp_head,
    qk_scale,
    QUERY_GROUP: tl.constexpr,
    KEY_BITS: tl.constexpr,
    KEY_SLOTS: tl.constexpr,
    KEY_CONTAINERS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_SLOTS: tl.constexpr,
    VALUE_CONTAINERS: tl.constexpr,
    VALUE_GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAIRED_ASM: tl.constexpr,
):
    """v3's low-bit loop over entries [first, end): (m_i, l_i, accs), accs a tuple of
    VALUE_SLOTS accumulators [BLOCK_G, VALUE_CONTAINERS] (slot s, column c = dim c * VALUE_SLOTS + s).

    Codes are packed from the low bit, so in a row viewed as C 16-bit containers of S codes,
    container c's slot s is dim c * S + s. Each slot of a block is then one [BLOCK_N, C]
    tile computed elementwise from the loaded containers, and the dots run per slot: the
    logits as the sum over key slots of q[:, s::S] . K_s^T, the output of value slot s as
    p . V_s. The dequantized tiles never exist as a whole (v2 reshapes the unpacked codes
    into [BLOCK_N, D] and Triton stages that tile through shared memory for the mma, the
    bound measured in the fifth session). Groups are multiples of S, so a container's
    codes share one (scale, minimum) pair, gathered per container."""
    offs_g = tl.arange(0, BLOCK_G)
    group_mask = offs_g < QUERY_GROUP
    q_rows = q_ptr + request.to(tl.int64) * stride_q_batch + (kv_head * QUERY_GROUP + offs_g)[:, None] * stride_q_head
    offs_kc = tl.arange(0, KEY_CONTAINERS)
    offs_vc = tl.arange(0, VALUE_CONTAINERS)
    queries = ()
    for slot in tl.static_range(KEY_SLOTS):
        queries = queries + (tl.load(q_rows + (offs_kc * KEY_SLOTS + slot)[None, :], mask=group_mask[:, None],
                                     other=0.0).to(tl.float16),)
    key_pair = (offs_kc * KEY_SLOTS) // KEY_GROUP_SIZE
    value_pair = (offs_vc * VALUE_SLOTS) // VALUE_GROUP_SIZE
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    accs = ()
    for slot in tl.static_range(VALUE_SLOTS):
        accs = accs + (tl.zeros([BLOCK_G, VALUE_CONTAINERS], dtype=tl.float32),)
    for block_start in range(first, end, BLOCK_N):
        entries = block_start + offs_n
        valid = entries < end
        rows = tl.load(entry_row_ptr + entries, mask=valid, other=0).to(tl.int64)
        # Masked loads: an entry past the range reads zeros, never a row whose pairs may be NaN.
        k_containers = tl.load(k_containers_ptr + rows[:, None] * stride_kc_row + kv_head * stride_kc_head
                               + offs_kc[None, :], mask=valid[:, None], other=0)
        k_scale, k_min = _pair_halves(tl.load(k_pairs_ptr + rows[:, None] * stride_kp_row
                                              + kv_head * stride_kp_head + key_pair[None, :],
                                              mask=valid[:, None], other=0))
        logits = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        for slot in tl.static_range(KEY_SLOTS):
            keys = _slot_values(k_containers, k_scale, k_min, slot, KEY_BITS, PAIRED_ASM)
            logits = tl.dot(queries[slot], tl.trans(keys), logits)
        logits = tl.where(valid[None, :], logits * qk_scale, float("-inf"))
        m_i, l_i, p, alpha = _softmax_step(m_i, l_i, logits)
        p = p.to(tl.float16)
        v_containers = tl.load(v_containers_ptr + rows[:, None] * stride_vc_row + kv_head * stride_vc_head
                               + offs_vc[None, :], mask=valid[:, None], other=0)
        v_scale, v_min = _pair_halves(tl.load(v_pairs_ptr + rows[:, None] * stride_vp_row
                                              + kv_head * stride_vp_head + value_pair[None, :],
                                              mask=valid[:, None], other=0))
        updated = ()
        for slot in tl.static_range(VALUE_SLOTS):
            values = _slot_values(v_containers, v_scale, v_min, slot, VALUE_BITS, PAIRED_ASM)
            updated = updated + (tl.dot(p, values, accs[slot] * alpha[:, None]),)
        accs = updated
    return m_i, l_i, accs


@triton.jit
def _dense_tier_loop(q, m_i, l_i, acc, entry_row_ptr, first, end, kv_head, offs_n, offs_d, dim_mask, qk_scale,
                     k_ptr, v_ptr, stride_row, stride_head, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """v2's loop over one bf16 tier (staging, or a bf16 guard; K and V share strides): the
    softmax state after the tier's blocks in [first, end)."""
    for block_start in range(first, end, BLOCK_N):
        entries = block_start + offs_n
        valid = entries < end
        rows = tl.load(entry_row_ptr + entries, mask=valid, other=0).to(tl.int64)
        k = _load_dense_operand(k_ptr, rows, kv_head, stride_row, stride_head, valid, offs_d, dim_mask, DOT_PRECISION)
        logits = _block_logits(q, k, valid, qk_scale, DOT_PRECISION)
        v = _load_dense_operand(v_ptr, rows, kv_head, stride_row, stride_head, valid, offs_d, dim_mask, DOT_PRECISION)
        m_i, l_i, acc = _online_softmax_update(m_i, l_i, acc, logits, v, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _packed_tier_loop(
    q,
    m_i,
    l_i,
    acc,
    entry_row_ptr,
    first,  # this split's share of the tier's entries: [first, end)
    end,
    kv_head,
    offs_n,
    offs_d,
    dim_mask,
    qk_scale,
    k_codes_ptr,
    k_pairs_ptr,
    stride_k_row,
    stride_k_head,
    stride_k_pairs_row,
    stride_k_pairs_head,
    v_codes_ptr,
    v_pairs_ptr,
    stride_v_row,
    stride_v_head,
    stride_v_pairs_row,
    stride_v_pairs_head,
    HEAD_DIM: tl.constexpr,
    KEY_BITS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """v2's loop over one packed tier (low-bit, or the 8-bit guard): the softmax state after
    the tier's blocks in [first, end)."""
    if PREFETCH:
        # Software-pipelined by hand: entry rows two blocks ahead, packed words one block
        # ahead, so an iteration's loads depend only on what the previous one loaded and
        # overlap its arithmetic instead of waiting out two dependent round trips (rows,
        # then the rows' words). Packed words are few registers, which makes this cheap.
        entries = first + offs_n
        valid = entries < end
        rows = tl.load(entry_row_ptr + entries, mask=valid, other=0).to(tl.int64)
        k_words, k_pairs = _load_packed_words(
            k_codes_ptr, k_pairs_ptr, rows, kv_head, stride_k_row, stride_k_head, stride_k_pairs_row,
            stride_k_pairs_head, valid, offs_d, dim_mask, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, BLOCK_N, BLOCK_D)
        v_words, v_pairs = _load_packed_words(
            v_codes_ptr, v_pairs_ptr, rows, kv_head, stride_v_row, stride_v_head, stride_v_pairs_row,
            stride_v_pairs_head, valid, offs_d, dim_mask, HEAD_DIM, VALUE_BITS, VALUE_GROUP_SIZE, BLOCK_N, BLOCK_D)
        next_valid = entries + BLOCK_N < end
        next_rows = tl.load(entry_row_ptr + entries + BLOCK_N, mask=next_valid, other=0).to(tl.int64)
        for block_start in range(first, end, BLOCK_N):
            ahead_entries = block_start + 2 * BLOCK_N + offs_n
            ahead_valid = ahead_entries < end
            ahead_rows = tl.load(entry_row_ptr + ahead_entries, mask=ahead_valid, other=0).to(tl.int64)
            next_k_words, next_k_pairs = _load_packed_words(
                k_codes_ptr, k_pairs_ptr, next_rows, kv_head, stride_k_row, stride_k_head, stride_k_pairs_row,
                stride_k_pairs_head, next_valid, offs_d, dim_mask, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE,
                BLOCK_N, BLOCK_D)
            next_v_words, next_v_pairs = _load_packed_words(
                v_codes_ptr, v_pairs_ptr, next_rows, kv_head, stride_v_row, stride_v_head, stride_v_pairs_row,
                stride_v_pairs_head, next_valid, offs_d, dim_mask, HEAD_DIM, VALUE_BITS, VALUE_GROUP_SIZE,
                BLOCK_N, BLOCK_D)
            k = _unpack_tile(k_words, k_pairs, offs_d, KEY_BITS, KEY_GROUP_SIZE, BLOCK_N, BLOCK_D)
            logits = _block_logits(q, k, valid, qk_scale, DOT_PRECISION)
            v = _unpack_tile(v_words, v_pairs, offs_d, VALUE_BITS, VALUE_GROUP_SIZE, BLOCK_N, BLOCK_D)
            m_i, l_i, acc = _online_softmax_update(m_i, l_i, acc, logits, v, DOT_PRECISION)
            k_words, k_pairs, v_words, v_pairs = next_k_words, next_k_pairs, next_v_words, next_v_pairs
            valid, next_valid, next_rows = next_valid, ahead_valid, ahead_rows
    else:
        for block_start in range(first, end, BLOCK_N):
            entries = block_start + offs_n
            valid = entries < end
            rows = tl.load(entry_row_ptr + entries, mask=valid, other=0).to(tl.int64)
            k = _load_packed_tile(k_codes_ptr, k_pairs_ptr, rows, kv_head, stride_k_row, stride_k_head,
                                  stride_k_pairs_row, stride_k_pairs_head, valid, offs_d, dim_mask,
                                  HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, BLOCK_N, BLOCK_D)
            logits = _block_logits(q, k, valid, qk_scale, DOT_PRECISION)
            v = _load_packed_tile(v_codes_ptr, v_pairs_ptr, rows, kv_head, stride_v_row, stride_v_head,
                                  stride_v_pairs_row, stride_v_pairs_head, valid, offs_d, dim_mask,
                                  HEAD_DIM, VALUE_BITS, VALUE_GROUP_SIZE, BLOCK_N, BLOCK_D)
            m_i, l_i, acc = _online_softmax_update(m_i, l_i, acc, logits, v, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit(**_ATTENTION_JIT)
def _decode_split_kernel_v2(
    q_ptr,  # [B, Hq, D]
    tier_indptr_ptr,  # [B, 4]: (staging start, low-bit start, guard start, end) per request
    entry_row_ptr,  # [E]
    staging_k_ptr,  # [rows, Hkv, D] bf16 (V has the same strides)
    staging_v_ptr,
    lowbit_k_codes_ptr,  # [rows, Hkv, words] int32
    lowbit_k_pairs_ptr,  # [rows, Hkv, groups] int32 view of the fp16 (scale, minimum) pairs
    lowbit_v_codes_ptr,
    lowbit_v_pairs_ptr,
    guard_k_ptr,  # dense: [rows, Hkv, D] bf16; packed: codes (K and V share one format)
    guard_k_pairs_ptr,  # packed guard only
    guard_v_ptr,
    guard_v_pairs_ptr,
    partial_out_ptr,  # [B, Hq, splits, D] fp32
    partial_lse_ptr,  # [B, Hq, splits] fp32, base 2
    qk_scale,  # scaling * log2(e): logits are kept in base 2 (exp2)
    stride_q_batch,
    stride_q_head,
    stride_tier_indptr_batch,
    stride_tier_indptr_tier,
    stride_staging_row,
    stride_staging_head,
    stride_lk_row,
    stride_lk_head,
    stride_lk_pairs_row,
    stride_lk_pairs_head,
    stride_lv_row,
    stride_lv_head,
    stride_lv_pairs_row,
    stride_lv_pairs_head,
    stride_guard_row,
    stride_guard_head,
    stride_guard_pairs_row,
    stride_guard_pairs_head,
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
    QUERY_GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    num_splits,  # a runtime value (_ATTENTION_JIT), as are the partial strides: one variant for any count
    KEY_BITS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_GROUP_SIZE: tl.constexpr,
    GUARD_PACKED: tl.constexpr,
    GUARD_BITS: tl.constexpr,
    GUARD_GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # the staging loop's dots (bf16 rows)
    LOWBIT_DOT_PRECISION: tl.constexpr,  # the low-bit loop's dots
    GUARD_DOT_PRECISION: tl.constexpr,  # the guard loop's dots
    PREFETCH: tl.constexpr,  # packed loops (low-bit, 8-bit guard) pipelined by hand (_packed_tier_loop)
    REGISTER_OPERANDS: tl.constexpr = False,  # v3: the low-bit loop of _lowbit_register_operand_loop
    KEY_SLOTS: tl.constexpr = 1,  # v3: codes per 16-bit container of the low-bit K / V codes
    VALUE_SLOTS: tl.constexpr = 1,
    PAIRED_ASM: tl.constexpr = False,  # v3: two containers per instruction (PTX; not in the interpreter)
):
    """v2: one loop per tier. Each tier's range of the request's entries is cut into the
    splits as v1 cuts the whole list (whole BLOCK_N blocks), and split s walks its share of
    every tier, so every block is of one known tier: no tier array is read, and each loop
    carries only its own loader (no masked loads, no dequantization work of the other
    tiers). A tier's last block in the split may be partial; `valid` masks its tail."""
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    staging_first, staging_end, lowbit_first, lowbit_end, guard_first, guard_end = _split_tier_ranges(
        tier_indptr_ptr, request, split, num_splits, stride_tier_indptr_batch, stride_tier_indptr_tier, BLOCK_N)
    q, q_heads, offs_d, group_mask, dim_mask = _load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, QUERY_GROUP, HEAD_DIM, BLOCK_G, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    # -- staging: bf16 rows.
    m_i, l_i, acc = _dense_tier_loop(q, m_i, l_i, acc, entry_row_ptr, staging_first, staging_end, kv_head, offs_n,
                                     offs_d, dim_mask, qk_scale, staging_k_ptr, staging_v_ptr, stride_staging_row,
                                     stride_staging_head, BLOCK_N, DOT_PRECISION)

    # -- low-bit: packed K and V, each in its own format.
    if REGISTER_OPERANDS:
        # v3: its own softmax state, written as split num_splits + split (the merge kernel
        # combines it with the bf16 tiers' state like any other split).
        lowbit_m, lowbit_l, lowbit_accs = _lowbit_register_operand_loop(
            q_ptr, request, kv_head, stride_q_batch, stride_q_head, entry_row_ptr, lowbit_first, lowbit_end,
            lowbit_k_codes_ptr, lowbit_k_pairs_ptr, stride_lk_row, stride_lk_head, stride_lk_pairs_row,
            stride_lk_pairs_head, lowbit_v_codes_ptr, lowbit_v_pairs_ptr, stride_lv_row, stride_lv_head,
            stride_lv_pairs_row, stride_lv_pairs_head, qk_scale, QUERY_GROUP, KEY_BITS, KEY_SLOTS,
            HEAD_DIM // KEY_SLOTS, KEY_GROUP_SIZE, VALUE_BITS, VALUE_SLOTS, HEAD_DIM // VALUE_SLOTS,
            VALUE_GROUP_SIZE, BLOCK_G, BLOCK_N, PAIRED_ASM)
        offs_vc = tl.arange(0, HEAD_DIM // VALUE_SLOTS)
        for slot in tl.static_range(VALUE_SLOTS):
            _store_split_partial(partial_out_ptr, partial_lse_ptr, lowbit_m, lowbit_l, lowbit_accs[slot], request,
                                 q_heads, num_splits + split, offs_vc * VALUE_SLOTS + slot, group_mask,
                                 offs_vc < HEAD_DIM // VALUE_SLOTS, stride_po_batch, stride_po_head,
                                 stride_po_split, stride_pl_batch, stride_pl_head)
    else:
        m_i, l_i, acc = _packed_tier_loop(
            q, m_i, l_i, acc, entry_row_ptr, lowbit_first, lowbit_end, kv_head, offs_n, offs_d, dim_mask, qk_scale,
            lowbit_k_codes_ptr, lowbit_k_pairs_ptr, stride_lk_row, stride_lk_head, stride_lk_pairs_row,
            stride_lk_pairs_head, lowbit_v_codes_ptr, lowbit_v_pairs_ptr, stride_lv_row, stride_lv_head,
            stride_lv_pairs_row, stride_lv_pairs_head, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS,
            VALUE_GROUP_SIZE, BLOCK_N, BLOCK_D, LOWBIT_DOT_PRECISION, PREFETCH)

    # -- guard: 8-bit packed rows (one format for K and V) through the same loop as the
    #    low-bit tier, or bf16 rows. GUARD_PACKED is a compile-time constant: one loop per kernel.
    if GUARD_PACKED:
        m_i, l_i, acc = _packed_tier_loop(
            q, m_i, l_i, acc, entry_row_ptr, guard_first, guard_end, kv_head, offs_n, offs_d, dim_mask, qk_scale,
            guard_k_ptr, guard_k_pairs_ptr, stride_guard_row, stride_guard_head, stride_guard_pairs_row,
            stride_guard_pairs_head, guard_v_ptr, guard_v_pairs_ptr, stride_guard_row, stride_guard_head,
            stride_guard_pairs_row, stride_guard_pairs_head, HEAD_DIM, GUARD_BITS, GUARD_GROUP_SIZE, GUARD_BITS,
            GUARD_GROUP_SIZE, BLOCK_N, BLOCK_D, GUARD_DOT_PRECISION, PREFETCH)
    else:
        m_i, l_i, acc = _dense_tier_loop(q, m_i, l_i, acc, entry_row_ptr, guard_first, guard_end, kv_head, offs_n,
                                         offs_d, dim_mask, qk_scale, guard_k_ptr, guard_v_ptr, stride_guard_row,
                                         stride_guard_head, BLOCK_N, GUARD_DOT_PRECISION)

    _store_split_partial(partial_out_ptr, partial_lse_ptr, m_i, l_i, acc, request, q_heads, split, offs_d,
                         group_mask, dim_mask, stride_po_batch, stride_po_head, stride_po_split,
                         stride_pl_batch, stride_pl_head)


# ---- v4: dequantize after the dot -----------------------------------------------------------------
# A packed row is code * scale + minimum per group, so for one group's channels
#   q . k = scale * (q . codes) + minimum * sum(q)   and   sum_n p_n v_n = (p * scale) . codes + p . minimum.
# v4 feeds the raw codes to the dots and applies the (scale, minimum) pairs to the [BLOCK_G, BLOCK_N]
# logits and probabilities instead of to the [BLOCK_N, D] tiles: no per-element multiply-add, no
# broadcast of the pairs over their channels, no fp32 tile. Codes become fp16 by the exponent trick
# (1024's bit pattern OR the code is 1024 + code, exactly; for keys the 1024 is folded into the
# minimum's term, for values subtracted in fp16, exactly), so a code costs a shift and a mask. Groups
# differ in their pairs, so the dots run per group: logits as a sum over key groups, the output in
# column slices (`accs`, a tuple of [BLOCK_G, ACC_COLS]).
@triton.jit
def _load_slice_words(codes_ptr, pairs_ptr, rows, kv_head, stride_row, stride_head, stride_pairs_row,
                      stride_pairs_head, valid, START: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr,
                      GROUP_SIZE: tl.constexpr):
    """The packed words of channels [START, START + COLS) of a block of rows ([BLOCK_N, COLS / codes
    per word] for 2/4/8 bits, one word per channel for 3 bits) and their group's int32 pair
    [BLOCK_N]; 0 where `valid` is false. The slice lies inside one group."""
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    row_base = codes_ptr + rows * stride_row + kv_head * stride_head
    if BITS != 3:
        offs_word = START // CODES_PER_WORD + tl.arange(0, COLS // CODES_PER_WORD)
    else:
        offs_word = (START + tl.arange(0, COLS)) // CODES_PER_WORD
    words = tl.load(row_base[:, None] + offs_word[None, :], mask=valid[:, None], other=0)
    pairs = tl.load(pairs_ptr + rows * stride_pairs_row + kv_head * stride_pairs_head + START // GROUP_SIZE,
                    mask=valid, other=0)
    return words, pairs


@triton.jit
def _pair_order(COLS: tl.constexpr, BITS: tl.constexpr, PAIR_ORDER: tl.constexpr, LANE_ORDER: tl.constexpr = False):
    """The channel (of a slice of COLS) at each column of `_biased_codes`' tiles: with PAIR_ORDER,
    for 2/4/8-bit codes, each word's slots in the order s, s + half, s + 1, s + 1 + half, ...
    (half = slots / 2), the order in which one 32-bit value holds two biased codes; else, and
    for 3 bits, channel order. LANE_ORDER (with PAIR_ORDER, 2/4/8 bits in at least 4 words, one
    per lane of a quad; else PAIR_ORDER's): column t + 2 * (w // n) + 8 * (w % n) + 2 * words * s (n = words / 4)
    holds the code of slot s + t * half of word w, so lane q of a quad takes words q * n ... q * n +
    n - 1, adjacent in memory."""
    columns = tl.arange(0, COLS)
    IN_LANES: tl.constexpr = PAIR_ORDER and LANE_ORDER and BITS != 3 and COLS * BITS // 32 >= 4
    if IN_LANES:
        CODES_PER_WORD: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = CODES_PER_WORD // 2
        WORDS: tl.constexpr = COLS // CODES_PER_WORD
        top = columns % 2
        word = ((columns // 2) % 4) * (WORDS // 4) + (columns // 8) % (WORDS // 4)
        slot = columns // (2 * WORDS)
        return word * CODES_PER_WORD + top * HALF + slot
    elif PAIR_ORDER and BITS != 3:
        CODES_PER_WORD: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = CODES_PER_WORD // 2
        in_word = columns % CODES_PER_WORD
        return columns - in_word + (in_word % 2) * HALF + in_word // 2
    else:
        return columns


@triton.jit
def _join_by_top_bit(tiles, COUNT: tl.constexpr):
    """COUNT (2, 4, 8 or 16) tiles of one shape [...] joined into [..., 2, ..., 2], the trailing
    axes the bits of the tile's index, top bit first (so that the flattened trailing index is the
    index): level by level, tile i with tile i + half."""
    LEVELS: tl.constexpr = 4 if COUNT == 16 else (3 if COUNT == 8 else (2 if COUNT == 4 else 1))  # log2(COUNT)
    for level in tl.static_range(LEVELS):
        joined = ()
        for index in tl.static_range(COUNT >> (level + 1)):
            joined = joined + (tl.join(tiles[index], tiles[index + (COUNT >> (level + 1))]),)
        tiles = joined
    return tiles[0]


@triton.jit
def _slots_first(pairs, HALF: tl.constexpr):
    """[BLOCK_N, 4, W / 4, 2, ...] (the slot bits last, HALF slots) -> [BLOCK_N, 2, ..., W / 4, 4]."""
    if HALF == 2:
        return tl.permute(pairs, (0, 3, 2, 1))
    elif HALF == 4:
        return tl.permute(pairs, (0, 3, 4, 2, 1))
    else:
        return tl.permute(pairs, (0, 3, 4, 5, 2, 1))


@triton.jit
def _biased_codes(words, pair_bias, START: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAIR_ORDER: tl.constexpr, IN_PLACE: tl.constexpr = False,
                  LANE_ORDER: tl.constexpr = False):
    """fp16 1024 + code, [BLOCK_N, COLS], of `_load_slice_words`' words (exact: codes < 1024),
    columns in `_pair_order`: the dots take the queries in that order and the value tiles'
    accumulators are kept in it (`_to_pair_order`). `pair_bias`: CODE_BIAS, as a literal or (v4's
    BIAS_REGISTER) as the kernel argument `code_bias`, which ptxas must then hold in a register:
    LOP3 encodes one immediate, so with the pair mask and the bias both literal each pair costs
    two LOP3, with the bias in a register one (v5:64's low-bit loop 773 -> 709 instructions for
    K4V2 g64 as the engine runs it, compiled for sm_90).

    IN_PLACE (with PAIR_ORDER; for value codes): each pair masked where it lies in the word, not
    shifted down first, so a tile holds 1024 + code * 2^position (`_in_place_scales`: exact while
    the code stays in the 10-bit mantissa); the slots above bit 10 of each half come from one
    shift of the word by their base. One shift per word instead of one per slot (7 -> 1 for
    2-bit codes). The caller undoes the power of two per channel on the accumulators.

    LANE_ORDER (with PAIR_ORDER; for key codes, 2/4/8 bits in at least 4 words): the pairs in
    `_pair_order(LANE_ORDER=True)`, in which the columns a thread holds of an mma operand (with
    two 16-bit values per register: columns 2q, 2q + 1, + 8, + 16, ... for lane q of a quad) come
    from whole words, so the tile can be built in the operand's own layout: no round trip of the
    fp16 tile through shared memory (stores, a barrier, ldmatrix) to reach the tensor cores; the
    words themselves still move to their lanes (shuffles, or shared-memory loads with
    PIPELINED_LOADS)."""
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    MAX_CODE: tl.constexpr = (1 << BITS) - 1
    IN_LANES: tl.constexpr = PAIR_ORDER and LANE_ORDER and BITS != 3 and COLS * BITS // 32 >= 4
    if IN_LANES:
        HALF: tl.constexpr = CODES_PER_WORD // 2
        PAIR_MASK: tl.constexpr = MAX_CODE | (MAX_CODE << 16)
        WORDS: tl.constexpr = COLS // CODES_PER_WORD
        grouped = tl.reshape(words, [BLOCK_N, 4, WORDS // 4])  # word w at (w // n, w % n), n = WORDS / 4
        tiles = ()
        for slot in tl.static_range(HALF):
            tiles = tiles + (((grouped >> (slot * BITS)) & PAIR_MASK) | pair_bias,)
        pairs = _slots_first(_join_by_top_bit(tiles, HALF), HALF)
        codes = tl.reshape(tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)), [BLOCK_N, COLS])
    elif PAIR_ORDER and BITS != 3:
        # Slots s and s + half lie 16 bits apart: one shift and one mask give both, biased, as
        # the two halves of one 32-bit value. The pairs are joined (slot s's top bit first) and
        # each split into its halves last, so every pair stays one register (channel order, below,
        # costs a shift, a mask and a byte permute per code).
        HALF: tl.constexpr = CODES_PER_WORD // 2
        PAIR_MASK: tl.constexpr = MAX_CODE | (MAX_CODE << 16)
        tiles = ()
        if IN_PLACE:
            LOW_SLOTS: tl.constexpr = _MANTISSA_BITS // BITS  # slots whose codes fit below bit 10 in place
            upper = words >> (LOW_SLOTS * BITS)
            for slot in tl.static_range(HALF):
                if slot < LOW_SLOTS:
                    tiles = tiles + ((words & (tl.constexpr(PAIR_MASK) << (slot * BITS))) | pair_bias,)
                else:
                    tiles = tiles + ((upper & (tl.constexpr(PAIR_MASK) << ((slot - LOW_SLOTS) * BITS))) | pair_bias,)
        else:
            for slot in tl.static_range(HALF):
                tiles = tiles + (((words >> (slot * BITS)) & PAIR_MASK) | pair_bias,)
        pairs = _join_by_top_bit(tiles, HALF)
        codes = tl.reshape(tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)), [BLOCK_N, COLS])
    elif BITS != 3:
        # Channel order: slot s of every word, biased, as one [BLOCK_N, words] tile each; then
        # joined into [BLOCK_N, words, 2, ..., 2] so that the flattened trailing index is the slot,
        # which makes channel word * CODES_PER_WORD + slot a reshape. Joins keep a word's codes in
        # one thread (an outer-product broadcast of words x shifts spreads them over lanes, and
        # the tile then goes to shared memory one 16-bit store per code).
        tiles = ()
        for slot in tl.static_range(CODES_PER_WORD):
            tiles = tiles + ((((words >> (slot * BITS)) & MAX_CODE) | 0x6400).to(tl.int16),)
        codes = tl.reshape(_join_by_top_bit(tiles, CODES_PER_WORD), [BLOCK_N, COLS])
    else:
        codes = (((words >> (((START + tl.arange(0, COLS)) % CODES_PER_WORD) * BITS)[None, :]) & MAX_CODE)
                 | 0x6400).to(tl.int16)
    return codes.to(tl.float16, bitcast=True)


@triton.jit
def _in_place_scales(COLS: tl.constexpr, BITS: tl.constexpr):
    """fp32 [COLS]: the power of two by which `_biased_codes(IN_PLACE=True)` multiplies the code
    at each column (pair order): 2^position of its slot in its half of the word, counted from 0,
    or from the shift's base for the slots above `_MANTISSA_BITS`; 1 for 3-bit codes (never in place)."""
    if BITS == 3:  # channel order, shifted as ever
        return tl.full([COLS], 1.0, dtype=tl.float32)
    else:
        CODES_PER_WORD: tl.constexpr = 32 // BITS
        LOW_SLOTS: tl.constexpr = _MANTISSA_BITS // BITS
        slot = (tl.arange(0, COLS) % CODES_PER_WORD) // 2  # pair order: column 2s + top holds slot s of a half
        position = tl.where(slot < LOW_SLOTS, slot, slot - LOW_SLOTS) * BITS
        return (1 << position).to(tl.float32)


@triton.jit
def _to_pair_order(acc, COLS: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr, TRANSPOSED: tl.constexpr,
                   INVERSE: tl.constexpr = False):
    """An accumulator slice ([BLOCK_G, COLS], or [COLS, BLOCK_G] when TRANSPOSED) with its
    channels moved into `_pair_order` (INVERSE: back into channel order)."""
    if BITS != 3:
        WORDS: tl.constexpr = COLS // (32 // BITS)
        HALF: tl.constexpr = 16 // BITS
        # Channel w * slots + top * half + s <-> column w * slots + s * 2 + top: a transpose of
        # the two axes after the word's of [words, 2, half] (channel order) or [words, half, 2]
        # (pair order), whichever `acc` is in.
        OUTER: tl.constexpr = HALF if INVERSE else 2
        INNER: tl.constexpr = 2 if INVERSE else HALF
        if TRANSPOSED:
            acc = tl.reshape(tl.permute(tl.reshape(acc, [WORDS, OUTER, INNER, BLOCK_G]), (0, 2, 1, 3)), [COLS, BLOCK_G])
        else:
            acc = tl.reshape(tl.permute(tl.reshape(acc, [BLOCK_G, WORDS, OUTER, INNER]), (0, 1, 3, 2)), [BLOCK_G, COLS])
    return acc


@triton.jit
def _pair_floats(pairs):
    """fp32 (scale, minimum) of int32 pairs."""
    scale, minimum = _pair_halves(pairs)
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _load_query_slices(q_ptr, request, kv_head, stride_q_batch, stride_q_head, QUERY_GROUP: tl.constexpr,
                       HEAD_DIM: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr, PAIR_ORDER: tl.constexpr,
                       BLOCK_G: tl.constexpr, DOT_PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr = False,
                       LANE_ORDER: tl.constexpr = False):
    """The GQA group's queries in column slices of COLS (one per key group; [BLOCK_G, COLS], or
    [COLS, BLOCK_G] when TRANSPOSED), channels in the `_pair_order` of BITS-bit keys, fp16 for
    "fp16" dots, else fp32, and each slice's sums per query of those values (for fp16, the sums
    must be of what the dots multiply, or the folded 1024 * sum would not cancel)."""
    offs_g = tl.arange(0, BLOCK_G)
    q_base = q_ptr + request.to(tl.int64) * stride_q_batch + (kv_head * QUERY_GROUP + offs_g) * stride_q_head
    slices = ()
    sums = ()
    for index in tl.static_range(HEAD_DIM // COLS):
        cols = index * COLS + _pair_order(COLS, BITS, PAIR_ORDER, LANE_ORDER)
        if TRANSPOSED:
            q_slice = tl.load(q_base[None, :] + cols[:, None], mask=(offs_g < QUERY_GROUP)[None, :], other=0.0)
        else:
            q_slice = tl.load(q_base[:, None] + cols[None, :], mask=(offs_g < QUERY_GROUP)[:, None], other=0.0)
        q_slice = q_slice.to(tl.float16) if DOT_PRECISION == "fp16" else q_slice.to(tl.float32)
        slices = slices + (q_slice,)
        sums = sums + (tl.sum(q_slice.to(tl.float32), axis=0 if TRANSPOSED else 1),)
    return slices, sums


@triton.jit
def _load_rows(entry_row_ptr, entries, valid, WIDE_OFFSETS: tl.constexpr):
    """The tier rows of `entries` (0 where not `valid`) as the index of the tables' offsets:
    int64 with WIDE_OFFSETS, else int32, which `decode_attention` allows only where every offset
    of every table fits (`_needs_wide_offsets`); 32-bit offsets spare each address its 64-bit
    multiply-add (packed loop body 752 -> 721 instructions, compile-kernels-2026-12-02-g)."""
    rows = tl.load(entry_row_ptr + entries, mask=valid, other=0)
    if WIDE_OFFSETS:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def _dense_tier_loop_sliced(q, m_i, l_i, accs, entry_row_ptr, first, end, kv_head, offs_n, offs_d, dim_mask,
                            qk_scale, k_ptr, v_ptr, stride_row, stride_head, HEAD_DIM: tl.constexpr,
                            ACC_COLS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            WIDE_OFFSETS: tl.constexpr):
    """v4's loop over one bf16 tier: v2's dense loop with V read and accumulated in the
    column slices of `accs`."""
    for block_start in range(first, end, BLOCK_N):
        entries = block_start + offs_n
        valid = entries < end
        rows = _load_rows(entry_row_ptr, entries, valid, WIDE_OFFSETS)
        k = _load_dense_operand(k_ptr, rows, kv_head, stride_row, stride_head, valid, offs_d, dim_mask, DOT_PRECISION)
        m_i, l_i, p, alpha = _softmax_step(m_i, l_i, _block_logits(q, k, valid, qk_scale, DOT_PRECISION))
        updated = ()
        for index in tl.static_range(HEAD_DIM // ACC_COLS):
            cols = index * ACC_COLS + tl.arange(0, ACC_COLS)
            v = _load_dense_operand(v_ptr, rows, kv_head, stride_row, stride_head, valid, cols, cols < HEAD_DIM,
                                    DOT_PRECISION)
            updated = updated + (accs[index] * alpha[:, None] + _dot(p, v, DOT_PRECISION),)
        accs = updated
    return m_i, l_i, accs


@triton.jit
def _load_factored_block(k_codes_ptr, k_pairs_ptr, v_codes_ptr, v_pairs_ptr, rows, kv_head, valid,
                         stride_k_row, stride_k_head, stride_k_pairs_row, stride_k_pairs_head,
                         stride_v_row, stride_v_head, stride_v_pairs_row, stride_v_pairs_head,
                         HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, KEY_GROUP_SIZE: tl.constexpr,
                         VALUE_BITS: tl.constexpr, VALUE_GROUP_SIZE: tl.constexpr, ACC_COLS: tl.constexpr):
    """One block's packed words and pairs: K per key group, V per output slice (tuples)."""
    k_words = ()
    k_pairs = ()
    for group in tl.static_range(HEAD_DIM // KEY_GROUP_SIZE):
        words, pairs = _load_slice_words(k_codes_ptr, k_pairs_ptr, rows, kv_head, stride_k_row, stride_k_head,
                                         stride_k_pairs_row, stride_k_pairs_head, valid, group * KEY_GROUP_SIZE,
                                         KEY_GROUP_SIZE, KEY_BITS, KEY_GROUP_SIZE)
        k_words = k_words + (words,)
        k_pairs = k_pairs + (pairs,)
    v_words = ()
    v_pairs = ()
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        words, pairs = _load_slice_words(v_codes_ptr, v_pairs_ptr, rows, kv_head, stride_v_row, stride_v_head,
                                         stride_v_pairs_row, stride_v_pairs_head, valid, index * ACC_COLS,
                                         ACC_COLS, VALUE_BITS, VALUE_GROUP_SIZE)
        v_words = v_words + (words,)
        v_pairs = v_pairs + (pairs,)
    return k_words, k_pairs, v_words, v_pairs


@triton.jit
def _factored_block_update(q_slices, q_sums, m_i, l_i, accs, pending, k_words, k_pairs, v_words, v_pairs, valid,
                           qk_scale, pair_bias, HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr,
                           KEY_GROUP_SIZE: tl.constexpr,
                           VALUE_BITS: tl.constexpr, ACC_COLS: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, PAIR_ORDER: tl.constexpr,
                           IN_PLACE_VALUES: tl.constexpr, LANE_KEYS: tl.constexpr):
    """Folds one block of packed rows into (m_i, l_i, accs, pending), dequantizing after the dots.
    "fp16" dots (the default) take fp16 operands, the 1024 of the keys' biased codes folded into
    the minimum's term; other precisions take fp32 operands (codes exact) through `_dot`.

    `pending` holds, per output slice, the minimums' share p * minimum elementwise
    ([BLOCK_G, BLOCK_N], rescaled like the accumulators); the caller sums it over the entries
    once after its loop. Summing it per block would cost a cross-warp reduction (shuffles and
    barriers: the mma layout splits the entries over the warps) in every block."""
    logits = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for group in tl.static_range(HEAD_DIM // KEY_GROUP_SIZE):
        codes = _biased_codes(k_words[group], pair_bias, group * KEY_GROUP_SIZE, KEY_GROUP_SIZE, KEY_BITS, BLOCK_N,
                              PAIR_ORDER, False, LANE_KEYS)
        scale, minimum = _pair_floats(k_pairs[group])
        if DOT_PRECISION == "fp16":
            # q . (1024 + codes) * scale + sum(q) * (minimum - 1024 * scale) = q . (codes * scale + minimum)
            biased = tl.dot(q_slices[group], tl.trans(codes))
            logits += biased * scale[None, :] + q_sums[group][:, None] * (minimum - 1024.0 * scale)[None, :]
        else:
            raw = _dot(q_slices[group], tl.trans((codes - 1024.0).to(tl.float32)), DOT_PRECISION)
            logits += raw * scale[None, :] + q_sums[group][:, None] * minimum[None, :]
    logits = tl.where(valid[None, :], logits * qk_scale, float("-inf"))
    m_i, l_i, p, alpha = _softmax_step(m_i, l_i, logits)
    updated = ()
    updated_pending = ()
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        # The codes themselves (1024 + code - 1024 is exact in fp16), so the dot needs no offset;
        # with IN_PLACE_VALUES code * 2^position, undone on the accumulators (_factored_tier_loop).
        codes = _biased_codes(v_words[index], pair_bias, index * ACC_COLS, ACC_COLS, VALUE_BITS, BLOCK_N,
                              PAIR_ORDER, IN_PLACE_VALUES) - 1024.0
        scale, minimum = _pair_floats(v_pairs[index])
        if DOT_PRECISION == "fp16":
            values = tl.dot((p * scale[None, :]).to(tl.float16), codes)
        else:
            values = _dot(p * scale[None, :], codes.to(tl.float32), DOT_PRECISION)
        updated = updated + (accs[index] * alpha[:, None] + values,)
        updated_pending = updated_pending + (pending[index] * alpha[:, None] + p * minimum[None, :],)
    return m_i, l_i, updated, updated_pending


@triton.jit
def _factored_block_update_transposed(q_slices, q_sums, m_i, l_i, accs, pending, k_words, k_pairs, v_words,
                                      v_pairs, valid, qk_scale, pair_bias, HEAD_DIM: tl.constexpr,
                                      KEY_BITS: tl.constexpr,
                                      KEY_GROUP_SIZE: tl.constexpr, VALUE_BITS: tl.constexpr,
                                      ACC_COLS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                                      DOT_PRECISION: tl.constexpr, PAIR_ORDER: tl.constexpr,
                                      IN_PLACE_VALUES: tl.constexpr, LANE_KEYS: tl.constexpr):
    """`_factored_block_update` with every tile transposed (v5; its precisions alike): logits^T =
    codes . q^T and acc^T = codes^T . (p * scale)^T, so that the block's entries are the dots'
    M dimension (64 at BLOCK_N 64: Hopper's wgmma, whose B operand, the queries or the
    probabilities, the tensor cores read from shared memory themselves, instead of every warp
    loading it into registers every block). accs: [ACC_COLS, BLOCK_G]; pending: [BLOCK_N, BLOCK_G]."""
    logits = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for group in tl.static_range(HEAD_DIM // KEY_GROUP_SIZE):
        codes = _biased_codes(k_words[group], pair_bias, group * KEY_GROUP_SIZE, KEY_GROUP_SIZE, KEY_BITS, BLOCK_N,
                              PAIR_ORDER, False, LANE_KEYS)
        scale, minimum = _pair_floats(k_pairs[group])
        if DOT_PRECISION == "fp16":
            biased = tl.dot(codes, q_slices[group])
            logits += biased * scale[:, None] + (minimum - 1024.0 * scale)[:, None] * q_sums[group][None, :]
        else:
            raw = _dot((codes - 1024.0).to(tl.float32), q_slices[group], DOT_PRECISION)
            logits += raw * scale[:, None] + minimum[:, None] * q_sums[group][None, :]
    logits = tl.where(valid[:, None], logits * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=0))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in _softmax_step
    p = tl.math.exp2(logits - m_shift[None, :])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    updated = ()
    updated_pending = ()
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        codes = _biased_codes(v_words[index], pair_bias, index * ACC_COLS, ACC_COLS, VALUE_BITS, BLOCK_N,
                              PAIR_ORDER, IN_PLACE_VALUES) - 1024.0
        scale, minimum = _pair_floats(v_pairs[index])
        if DOT_PRECISION == "fp16":
            values = tl.dot(tl.trans(codes), (p * scale[:, None]).to(tl.float16))
        else:
            values = _dot(tl.trans(codes.to(tl.float32)), p * scale[:, None], DOT_PRECISION)
        updated = updated + (accs[index] * alpha[None, :] + values,)
        updated_pending = updated_pending + (pending[index] * alpha[None, :] + p * minimum[:, None],)
    return m_new, l_i, updated, updated_pending


@triton.jit
def _fold_block(q_slices, q_sums, m_i, l_i, accs, pending, k_words, k_pairs, v_words, v_pairs, valid, qk_scale,
                pair_bias, HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, KEY_GROUP_SIZE: tl.constexpr,
                VALUE_BITS: tl.constexpr, ACC_COLS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr, PAIR_ORDER: tl.constexpr,
                IN_PLACE_VALUES: tl.constexpr, LANE_KEYS: tl.constexpr):
    """One block through `_factored_block_update`, or its transposed form (v5)."""
    if TRANSPOSED:
        return _factored_block_update_transposed(
            q_slices, q_sums, m_i, l_i, accs, pending, k_words, k_pairs, v_words, v_pairs, valid, qk_scale, pair_bias,
            HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS, ACC_COLS, BLOCK_G, BLOCK_N, DOT_PRECISION, PAIR_ORDER,
            IN_PLACE_VALUES, LANE_KEYS)
    else:
        return _factored_block_update(
            q_slices, q_sums, m_i, l_i, accs, pending, k_words, k_pairs, v_words, v_pairs, valid, qk_scale, pair_bias,
            HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS, ACC_COLS, BLOCK_G, BLOCK_N, DOT_PRECISION, PAIR_ORDER,
            IN_PLACE_VALUES, LANE_KEYS)


@triton.jit
def _scale_channels(acc, scales, TRANSPOSED: tl.constexpr):
    """An accumulator slice ([BLOCK_G, COLS], or [COLS, BLOCK_G] when TRANSPOSED) times a per-channel [COLS]."""
    if TRANSPOSED:
        return acc * scales[:, None]
    else:
        return acc * scales[None, :]


@triton.jit
def _factored_tier_loop(q_slices, q_sums, m_i, l_i, accs, entry_row_ptr, first, end, kv_head, offs_n, qk_scale,
                        pair_bias, k_codes_ptr, k_pairs_ptr, stride_k_row, stride_k_head, stride_k_pairs_row,
                        stride_k_pairs_head, v_codes_ptr, v_pairs_ptr, stride_v_row, stride_v_head,
                        stride_v_pairs_row, stride_v_pairs_head, HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr,
                        KEY_GROUP_SIZE: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP_SIZE: tl.constexpr,
                        ACC_COLS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr, PAIR_ORDER: tl.constexpr,
                        IN_PLACE_VALUES: tl.constexpr, LANE_KEYS: tl.constexpr, PIPELINED_LOADS: tl.constexpr,
                        WIDE_OFFSETS: tl.constexpr):
    """v4's loop over one packed tier (low-bit, or an 8-bit guard), pipelined by hand as v2's
    (entry rows two blocks ahead, packed words one block ahead; PIPELINED_LOADS below). TRANSPOSED (v5): the blocks
    through `_factored_block_update_transposed`, the accumulators transposed on the way in and out.
    IN_PLACE_VALUES: the value codes unshifted (`_biased_codes`), so the accumulators run scaled
    by `_in_place_scales` per channel while the loop does: powers of two, exact both ways (every
    term of a channel's sums scales alike, so the rounding does too). LANE_KEYS: the key codes in
    lane order (`_biased_codes`; the queries must be in it too, `_load_query_slices`).
    PIPELINED_LOADS: each block's rows, words and pairs loaded in the loop, not one block ahead by
    hand, for Triton's software pipeliner, which copies them asynchronously into shared memory and
    reads them back in the layout their use wants: with LANE_KEYS the key words straight into the
    lanes whose operand columns they fill, where the hand-prefetched words get there by shuffles
    (compiled for sm_90, compile-kernels-2026-12-02-f)."""
    # The hand-pipelined loop's first blocks (unused, and compiled away, with PIPELINED_LOADS).
    entries = first + offs_n
    valid = entries < end
    rows = _load_rows(entry_row_ptr, entries, valid, WIDE_OFFSETS)
    k_words, k_pairs, v_words, v_pairs = _load_factored_block(
        k_codes_ptr, k_pairs_ptr, v_codes_ptr, v_pairs_ptr, rows, kv_head, valid, stride_k_row, stride_k_head,
        stride_k_pairs_row, stride_k_pairs_head, stride_v_row, stride_v_head, stride_v_pairs_row,
        stride_v_pairs_head, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS, VALUE_GROUP_SIZE, ACC_COLS)
    next_valid = entries + BLOCK_N < end
    next_rows = _load_rows(entry_row_ptr, entries + BLOCK_N, next_valid, WIDE_OFFSETS)
    pending = ()
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        if TRANSPOSED:
            pending = pending + (tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32),)
        else:
            pending = pending + (tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32),)
    # The accumulators transposed for v5, and in the value codes' pair order, while the loop runs.
    ordered = ()
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        acc = tl.trans(accs[index]) if TRANSPOSED else accs[index]
        if PAIR_ORDER:
            acc = _to_pair_order(acc, ACC_COLS, VALUE_BITS, BLOCK_G, TRANSPOSED)
        if IN_PLACE_VALUES:
            acc = _scale_channels(acc, _in_place_scales(ACC_COLS, VALUE_BITS), TRANSPOSED)
        ordered = ordered + (acc,)
    accs = ordered
    if PIPELINED_LOADS:
        for block_start in range(first, end, BLOCK_N):
            block_entries = block_start + offs_n
            block_valid = block_entries < end
            block_rows = _load_rows(entry_row_ptr, block_entries, block_valid, WIDE_OFFSETS)
            block_k_words, block_k_pairs, block_v_words, block_v_pairs = _load_factored_block(
                k_codes_ptr, k_pairs_ptr, v_codes_ptr, v_pairs_ptr, block_rows, kv_head, block_valid, stride_k_row,
                stride_k_head, stride_k_pairs_row, stride_k_pairs_head, stride_v_row, stride_v_head,
                stride_v_pairs_row, stride_v_pairs_head, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS,
                VALUE_GROUP_SIZE, ACC_COLS)
            m_i, l_i, accs, pending = _fold_block(
                q_slices, q_sums, m_i, l_i, accs, pending, block_k_words, block_k_pairs, block_v_words, block_v_pairs,
                block_valid, qk_scale, pair_bias, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS, ACC_COLS, BLOCK_G,
                BLOCK_N, DOT_PRECISION, TRANSPOSED, PAIR_ORDER, IN_PLACE_VALUES, LANE_KEYS)
    else:
        for block_start in range(first, end, BLOCK_N):
            ahead_entries = block_start + 2 * BLOCK_N + offs_n
            ahead_valid = ahead_entries < end
            ahead_rows = _load_rows(entry_row_ptr, ahead_entries, ahead_valid, WIDE_OFFSETS)
            next_k_words, next_k_pairs, next_v_words, next_v_pairs = _load_factored_block(
                k_codes_ptr, k_pairs_ptr, v_codes_ptr, v_pairs_ptr, next_rows, kv_head, next_valid, stride_k_row,
                stride_k_head, stride_k_pairs_row, stride_k_pairs_head, stride_v_row, stride_v_head,
                stride_v_pairs_row, stride_v_pairs_head, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS,
                VALUE_GROUP_SIZE, ACC_COLS)
            m_i, l_i, accs, pending = _fold_block(
                q_slices, q_sums, m_i, l_i, accs, pending, k_words, k_pairs, v_words, v_pairs, valid, qk_scale,
                pair_bias, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS, ACC_COLS, BLOCK_G, BLOCK_N, DOT_PRECISION,
                TRANSPOSED, PAIR_ORDER, IN_PLACE_VALUES, LANE_KEYS)
            k_words, k_pairs, v_words, v_pairs = next_k_words, next_k_pairs, next_v_words, next_v_pairs
            valid, next_valid, next_rows = next_valid, ahead_valid, ahead_rows
    settled = ()
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        acc = accs[index]
        if IN_PLACE_VALUES:
            acc = _scale_channels(acc, 1.0 / _in_place_scales(ACC_COLS, VALUE_BITS), TRANSPOSED)
        if TRANSPOSED:
            acc = acc + tl.sum(pending[index], axis=0)[None, :]
        else:
            acc = acc + tl.sum(pending[index], axis=1)[:, None]
        if PAIR_ORDER:
            acc = _to_pair_order(acc, ACC_COLS, VALUE_BITS, BLOCK_G, TRANSPOSED, True)
        settled = settled + (tl.trans(acc) if TRANSPOSED else acc,)
    return m_i, l_i, settled


@triton.jit(**_ATTENTION_JIT)
def _decode_split_kernel_v4(
    q_ptr, tier_indptr_ptr, entry_row_ptr, staging_k_ptr, staging_v_ptr, lowbit_k_codes_ptr, lowbit_k_pairs_ptr,
    lowbit_v_codes_ptr, lowbit_v_pairs_ptr, guard_k_ptr, guard_k_pairs_ptr, guard_v_ptr, guard_v_pairs_ptr,
    partial_out_ptr, partial_lse_ptr, qk_scale, stride_q_batch, stride_q_head, stride_tier_indptr_batch,
    stride_tier_indptr_tier, stride_staging_row, stride_staging_head, stride_lk_row, stride_lk_head,
    stride_lk_pairs_row, stride_lk_pairs_head, stride_lv_row, stride_lv_head, stride_lv_pairs_row,
    stride_lv_pairs_head, stride_guard_row, stride_guard_head, stride_guard_pairs_row, stride_guard_pairs_head,
    stride_po_batch, stride_po_head, stride_po_split, stride_pl_batch, stride_pl_head,
    QUERY_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, num_splits,
    code_bias,  # CODE_BIAS, read with BIAS_REGISTER
    KEY_BITS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP_SIZE: tl.constexpr,
    GUARD_PACKED: tl.constexpr, GUARD_BITS: tl.constexpr, GUARD_GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,  # the bf16 loops' dots
    PACKED_DOT_PRECISION: tl.constexpr,  # the packed loops' dots
    ACC_COLS: tl.constexpr,  # output slice width: the smallest value group size of the packed tiers
    TRANSPOSED: tl.constexpr = False,  # v5: the packed loops' tiles transposed (_factored_block_update_transposed)
    PAIR_ORDER: tl.constexpr = False,  # packed codes in pair order (_biased_codes, _pair_order)
    BIAS_REGISTER: tl.constexpr = False,  # the pairs' bias from `code_bias`, not a literal (_biased_codes)
    IN_PLACE_VALUES: tl.constexpr = False,  # value codes masked in place, not shifted (_biased_codes)
    LANE_KEYS: tl.constexpr = False,  # key codes (and the queries) in lane order (_biased_codes)
    PIPELINED_LOADS: tl.constexpr = False,  # packed loops' loads by Triton's pipeliner (_factored_tier_loop)
    WIDE_OFFSETS: tl.constexpr = True,  # 64-bit row offsets (_load_rows); False only where all fit in 32 bits
):
    """v4: v2's split ranges and per-tier loops (arguments as `_decode_split_kernel_v2`'s), with
    packed tiers dequantized after the dots (`_factored_block_update`) and the output kept in
    column slices of ACC_COLS channels, each inside one value group of every packed format."""
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    staging_first, staging_end, lowbit_first, lowbit_end, guard_first, guard_end = _split_tier_ranges(
        tier_indptr_ptr, request, split, num_splits, stride_tier_indptr_batch, stride_tier_indptr_tier, BLOCK_N)
    q, q_heads, offs_d, group_mask, dim_mask = _load_group_queries(
        q_ptr, request, kv_head, stride_q_batch, stride_q_head, QUERY_GROUP, HEAD_DIM, BLOCK_G, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    accs = ()
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        accs = accs + (tl.zeros([BLOCK_G, ACC_COLS], dtype=tl.float32),)
    if BIAS_REGISTER:
        pair_bias = code_bias
    else:
        pair_bias = _CODE_BIAS

    m_i, l_i, accs = _dense_tier_loop_sliced(q, m_i, l_i, accs, entry_row_ptr, staging_first, staging_end, kv_head,
                                             offs_n, offs_d, dim_mask, qk_scale, staging_k_ptr, staging_v_ptr,
                                             stride_staging_row, stride_staging_head, HEAD_DIM, ACC_COLS, BLOCK_N,
                                             DOT_PRECISION, WIDE_OFFSETS)
    q_slices, q_sums = _load_query_slices(q_ptr, request, kv_head, stride_q_batch, stride_q_head, QUERY_GROUP,
                                          HEAD_DIM, KEY_GROUP_SIZE, KEY_BITS, PAIR_ORDER, BLOCK_G,
                                          PACKED_DOT_PRECISION, TRANSPOSED, LANE_KEYS)
    m_i, l_i, accs = _factored_tier_loop(
        q_slices, q_sums, m_i, l_i, accs, entry_row_ptr, lowbit_first, lowbit_end, kv_head, offs_n, qk_scale,
        pair_bias, lowbit_k_codes_ptr, lowbit_k_pairs_ptr, stride_lk_row, stride_lk_head, stride_lk_pairs_row,
        stride_lk_pairs_head, lowbit_v_codes_ptr, lowbit_v_pairs_ptr, stride_lv_row, stride_lv_head,
        stride_lv_pairs_row, stride_lv_pairs_head, HEAD_DIM, KEY_BITS, KEY_GROUP_SIZE, VALUE_BITS,
        VALUE_GROUP_SIZE, ACC_COLS, BLOCK_G, BLOCK_N, PACKED_DOT_PRECISION, TRANSPOSED, PAIR_ORDER, IN_PLACE_VALUES,
        LANE_KEYS, PIPELINED_LOADS, WIDE_OFFSETS)
    if GUARD_PACKED:
        guard_q_slices, guard_q_sums = _load_query_slices(q_ptr, request, kv_head, stride_q_batch, stride_q_head,
                                                          QUERY_GROUP, HEAD_DIM, GUARD_GROUP_SIZE, GUARD_BITS,
                                                          PAIR_ORDER, BLOCK_G, PACKED_DOT_PRECISION, TRANSPOSED,
                                                          LANE_KEYS)
        m_i, l_i, accs = _factored_tier_loop(
            guard_q_slices, guard_q_sums, m_i, l_i, accs, entry_row_ptr, guard_first, guard_end, kv_head, offs_n,
            qk_scale, pair_bias, guard_k_ptr, guard_k_pairs_ptr, stride_guard_row, stride_guard_head,
            stride_guard_pairs_row, stride_guard_pairs_head, guard_v_ptr, guard_v_pairs_ptr, stride_guard_row,
            stride_guard_head, stride_guard_pairs_row, stride_guard_pairs_head, HEAD_DIM, GUARD_BITS, GUARD_GROUP_SIZE,
            GUARD_BITS, GUARD_GROUP_SIZE, ACC_COLS, BLOCK_G, BLOCK_N, PACKED_DOT_PRECISION, TRANSPOSED, PAIR_ORDER,
            IN_PLACE_VALUES, LANE_KEYS, PIPELINED_LOADS, WIDE_OFFSETS)
    else:
        m_i, l_i, accs = _dense_tier_loop_sliced(q, m_i, l_i, accs, entry_row_ptr, guard_first, guard_end, kv_head,
                                                 offs_n, offs_d, dim_mask, qk_scale, guard_k_ptr, guard_v_ptr,
                                                 stride_guard_row, stride_guard_head, HEAD_DIM, ACC_COLS, BLOCK_N,
                                                 DOT_PRECISION, WIDE_OFFSETS)
    for index in tl.static_range(HEAD_DIM // ACC_COLS):
        cols = index * ACC_COLS + tl.arange(0, ACC_COLS)
        _store_split_partial(partial_out_ptr, partial_lse_ptr, m_i, l_i, accs[index], request, q_heads, split, cols,
                             group_mask, cols < HEAD_DIM, stride_po_batch, stride_po_head, stride_po_split,
                             stride_pl_batch, stride_pl_head)


@triton.jit(**_ATTENTION_JIT)
def _merge_splits_kernel(
    partial_out_ptr,  # [B, Hq, splits, D] fp32
    partial_lse_ptr,  # [B, Hq, splits] fp32, base 2
    out_ptr,  # [B, Hq, D] fp32, bf16 or fp16
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
    stride_out_batch,
    stride_out_head,
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLITS_PER_STEP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (request, query head): weights exp2(lse_s - max lse), output sum_s w_s out_s /
    sum_s w_s, SPLITS_PER_STEP splits at a time (the split count is a runtime value)."""
    request = tl.program_id(0).to(tl.int64)
    q_head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dim_mask = offs_d < HEAD_DIM
    lse_row = partial_lse_ptr + request * stride_pl_batch + q_head * stride_pl_head
    partial_row = partial_out_ptr + request * stride_po_batch + q_head * stride_po_head

    lse_max = tl.full([], float("-inf"), dtype=tl.float32)
    for first in range(0, num_splits, SPLITS_PER_STEP):
        offs_s = first + tl.arange(0, SPLITS_PER_STEP)
        lse = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(lse, axis=0))
    # A request without entries has only -inf: every weight is then 0 and the output 0.
    lse_shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([], dtype=tl.float32)
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, SPLITS_PER_STEP):
        offs_s = first + tl.arange(0, SPLITS_PER_STEP)
        split_mask = offs_s < num_splits
        weights = tl.math.exp2(tl.load(lse_row + offs_s, mask=split_mask, other=float("-inf")) - lse_shift)
        partial = tl.load(partial_row + offs_s[:, None] * stride_po_split + offs_d[None, :],
                          mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
        total += tl.sum(weights, axis=0)
        out += tl.sum(weights[:, None] * partial, axis=0)
    out = out / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + request * stride_out_batch + q_head * stride_out_head + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def _packed_args(codes: torch.Tensor, scale_min: torch.Tensor) -> tuple[tuple, tuple]:
    """(codes, pairs as int32) and their (row, head) strides; `pairs` views each fp16
    (scale, minimum) pair as one int32 so that the kernel reads both with one load."""
    if codes.stride(-1) != 1 or scale_min.stride(-1) != 1 or scale_min.stride(-2) != 2:
        raise ValueError("packed tables need contiguous words and (scale, minimum) pairs")
    pairs = scale_min.view(torch.int32).squeeze(-1)  # [rows, heads, groups]
    return (codes, pairs), (codes.stride(0), codes.stride(1), pairs.stride(0), pairs.stride(1))


@dataclass(frozen=True)
class _TierArgs:
    """The low-bit and guard tables of one layer as kernel arguments: packed tables as
    (codes, pairs) with their (row, head) strides, a bf16 guard as (rows, rows) with pair
    strides 0 (the pair pointer is a placeholder no load reads), and the guard's format."""

    lowbit_k: tuple
    lowbit_k_strides: tuple
    lowbit_v: tuple
    lowbit_v_strides: tuple
    guard_k: tuple
    guard_v: tuple
    guard_strides: tuple  # (row, head, pairs row, pairs head), shared by K and V
    guard_packed: bool
    guard_bits: int
    guard_group_size: int

    @classmethod
    def of(cls, lowbit: PackedTables, guard: "DenseTables | PackedTables", codes_view=None) -> "_TierArgs":
        """`codes_view`: applied to the low-bit code words first (v3's 16-bit containers)."""
        k_codes, v_codes = lowbit.k_codes, lowbit.v_codes
        if codes_view is not None:
            k_codes, v_codes = codes_view(k_codes), codes_view(v_codes)
        lowbit_k, lowbit_k_strides = _packed_args(k_codes, lowbit.k_scale_min)
        lowbit_v, lowbit_v_strides = _packed_args(v_codes, lowbit.v_scale_min)
        if isinstance(guard, PackedTables):
            if guard.key_format != guard.value_format:
                raise ValueError("a packed guard tier uses one format for K and V")
            guard_k, guard_strides = _packed_args(guard.k_codes, guard.k_scale_min)
            guard_v, guard_v_strides = _packed_args(guard.v_codes, guard.v_scale_min)
            if guard_strides != guard_v_strides:
                raise ValueError("packed guard K and V tables must have equal strides")
            return cls(lowbit_k, lowbit_k_strides, lowbit_v, lowbit_v_strides, guard_k, guard_v, guard_strides,
                       True, guard.key_format.bits, guard.key_format.group_size)
        if guard.k.stride() != guard.v.stride() or guard.k.stride(-1) != 1:
            raise ValueError("dense guard K and V tables need equal strides, contiguous last dim")
        return cls(lowbit_k, lowbit_k_strides, lowbit_v, lowbit_v_strides, (guard.k, guard.k), (guard.v, guard.v),
                   (guard.k.stride(0), guard.k.stride(1), 0, 0), False, 16, guard.head_dim)


def _needs_wide_offsets(*tables: torch.Tensor) -> bool:
    """Whether some element offset of some table (in elements, from its first one) passes int32,
    i.e. the split kernel must index rows in int64 (`_load_rows`). Runs per layer call on eager
    passes, so contiguous tables (a store's layers are) take the cheap exact bound, numel - 1,
    instead of summing every dimension's strides."""
    for table in tables:
        if table.is_contiguous():
            last = table.numel() - 1
        else:
            last = sum((size - 1) * stride for size, stride in zip(table.shape, table.stride()))
        if last > 2**31 - 1:
            return True
    return False


DECODE_VERSIONS = ("v1", "v2", "v3", "v4", "v5")
DOT_PRECISIONS = ("auto", "tf32", "fp16", "bf16", "ieee")


def register_operand_slots(fmt) -> int | None:
    """Codes per 16-bit container for v3's low-bit loop in PackedFormat `fmt`, or None
    where it does not apply: 2, 4 or 8 bits (3-bit codes straddle words: v2's loop), at
    least 16 containers per row (tl.dot's smallest K and N; head_dim 64 at 2 bits has 8),
    and groups that hold whole containers (one scale and minimum per container)."""
    if fmt.bits not in (2, 4, 8) or fmt.head_dim & (fmt.head_dim - 1):
        return None
    slots = 16 // fmt.bits
    if fmt.head_dim // slots < 16 or fmt.group_size % slots:
        return None
    return slots


def _container_view(codes: torch.Tensor) -> torch.Tensor:
    """The int32 code words as 16-bit containers (little-endian: container 2w is word w's
    low half, so container c holds dims c * slots ... c * slots + slots - 1)."""
    return codes.view(torch.int16)


def decode_attention(
    q: torch.Tensor,
    entries_indptr: torch.Tensor,
    entry_tier: torch.Tensor,
    entry_row: torch.Tensor,
    staging: DenseTables,
    lowbit: PackedTables,
    guard: DenseTables | PackedTables,
    scaling: float,
    num_splits: int = 4,
    *,
    tier_indptr: torch.Tensor | None = None,
    version: str | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 16,
    num_stages: int | None = None,
    dot_precision: str = "auto",
    num_warps: int = 4,
    prefetch: bool | None = None,
    max_registers: int | None = None,
    pair_order: bool = False,
    bias_register: bool = False,
    in_place_values: bool = False,
    lane_keys: bool = False,
    pipelined_loads: bool = False,
    wide_offsets: bool = False,
    block_g: int | None = None,
) -> torch.Tensor:
    """Attention of one decode query per request over its entries -> [B, Hq, D] (fp32,
    or `out`'s dtype).

    q: [B, Hq, D] (rotated like the keys); entries as `DecodeEntries` (CSR over requests);
    `scaling` multiplies q . k. `out` ([B, Hq, D], fp32, or bf16 / fp16: the merge rounds
    into it, saving a conversion launch per layer) is written in full if given.

    `version`: "v2" (the default when `tier_indptr`, `DecodeEntries.tier_indptr`, is
    given) loops over each request's staging / low-bit / guard ranges separately and
    reads neither `entries_indptr` nor `entry_tier`: the entries must be tier-grouped as
    the builders make them. "v1" (the default without `tier_indptr`) loads every tier
    under a mask per block; it also accepts unfiltered lists (entries of EMPTY / EVICTED
    tier are skipped). "v3" is v2 with the low-bit loop on register operands
    (`_lowbit_register_operand_loop`) where both low-bit formats allow it
    (`register_operand_slots`), else v2's loop; opt-in: 1.2-1.6x slower than v2 on the H200
    as of bench v12 (docs/kernels.md, "Ninth GPU session"). "v4" is v2 with packed rows
    dequantized after the dots (`_decode_split_kernel_v4`: raw codes into fp16 dots, the
    (scale, minimum) pairs applied to the logits and probabilities; its packed loops always
    prefetch; "auto" gives them fp16 operands). "v5" is v4 with the packed loops' tiles
    transposed (`_factored_block_update_transposed`). All give the same output up to summation
    order and fp16 rounding.

    `block_n`: entries per block (a power of two >= 16, tl.dot's minimum); `num_stages`:
    software-pipelining depth of the block loops (None: Triton's default). `dot_precision`:
    how the two tl.dot take their fp32 operands on the GPU: "tf32", "fp16" (the same
    10-bit mantissa, half the shared-memory traffic, fp16 range) or "ieee" (exact fp32,
    slow); "auto" (default) is fp16 where the rows are packed (v2's low-bit loop, and its
    guard loop for an 8-bit guard: their fp16 scales and minimums already bound the values
    to fp16 range) and tf32 for bf16 rows, which may exceed it (v1: tf32). "bf16" (v2-v5) is
    "auto" with the bf16 rows' dots on bf16 operands: the rows as stored (no conversion on
    the way to the tensor cores), the query and the probabilities rounded to bf16 as SGLang's
    own decode kernel rounds them. The interpreter computes "tf32" and "ieee" in full fp32,
    "fp16" and "bf16" with rounded operands.

    `prefetch` (v2's loops only, also under v3 for 3-bit formats; None: on there): the
    packed loops (low-bit, and an 8-bit guard's) load the next block's packed words (and the
    rows of the one after) before computing on the current block; the low-bit loop 11-22%
    faster on an H200 (docs/kernels.md, bench v6).

    `max_registers` (None: ptxas's choice) caps the split kernel's registers per thread (Triton's
    `maxnreg`), trading a few instructions, or spills, for more programs resident per SM: v5 at
    BLOCK_N 64 takes 219 registers unbounded, two 4-warp programs per SM; at 168, three.

    `pair_order` (v4 / v5): the packed loops unpack each register's two codes side by side
    (`_biased_codes`, `_pair_order`), the queries and the value accumulators taken in that order;
    11-14% fewer instructions in the low-bit loop; on the H200 v5 2-7% faster, v4 5-9% slower
    (bench v17). `bias_register` (with `pair_order`; opt-in): the pairs' fp16 bias comes from a
    kernel argument, so each pair is masked and biased in one LOP3 (`_biased_codes`); the output is
    the same bit for bit; on the H200 2-3% faster at 48x32K, up to 4% slower at 256x4K (bench v19,
    v20). `in_place_values` (with `pair_order`; the engine's choice for K4V2 g64): value codes
    masked where they lie in their word instead of shifted down, one shift per
    word instead of one per slot, the accumulators scaled by powers of two meanwhile; the output is
    the same bit for bit; on the H200 0.8-2.0% faster (bench v20). `lane_keys` (with `pair_order`;
    opt-in): key codes (and the queries) in lane order, so that the key tiles reach the tensor
    cores without a round trip through shared memory (`_biased_codes`); the same output up to the
    dots' summation order; on the H200 within 1.3% of the engine's kernel (bench v21: the
    shared-memory waits it removes come back as shuffles). `pipelined_loads` (v4 / v5; opt-in):
    the packed loops' loads left to Triton's software pipeliner instead of prefetched by hand
    (`_factored_tier_loop`); the same output bit for bit; on the H200 21-33% slower (bench v21).

    `wide_offsets` (v4 / v5): 64-bit row offsets even where 32 bits hold every offset of every
    table; without it v4 / v5 take 32-bit ones wherever they fit (`_needs_wide_offsets`: tables
    of fewer than 2**31 elements), v1-v3 always 64-bit ones. The same output bit for bit; on the
    H200 v4 0.1-3.8% faster with 32-bit offsets, v5 (K4V2 g64) between 0.5% faster and 2.8% slower
    (bench v22), so the engine passes `wide_offsets` for v5.

    `block_g` (v5; None: 16, or the GQA group's next power of two if larger): the rows the query
    group is padded to. v5's packed dots take the group as their N, which Hopper's wgmma and
    mma.sync allow down to 8, so 8 halves the padding of a 7-query group (Qwen2.5-7B's) in every
    softmax tile and accumulator; the same output up to the dots' summation order. Opt-in: below 16
    columns Triton compiles the dots to mma.sync instead of wgmma, 4-42% slower on the H200 but for
    one tie (bench v23)."""
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")
    if version is None:
        version = "v1" if tier_indptr is None else "v2"
    if version not in DECODE_VERSIONS:
        raise ValueError(f"version must be one of {DECODE_VERSIONS}, got {version!r}")
    if dot_precision == "bf16" and version == "v1":
        raise ValueError("dot_precision 'bf16' needs the tier loops of v2-v5 (v1 dots every tier together)")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    batch, q_heads, head_dim = q.shape
    kv_heads = staging.k.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    for name, tables in (("staging", staging), ("lowbit", lowbit), ("guard", guard)):
        if tables.head_dim != head_dim:
            raise ValueError(f"{name} head_dim {tables.head_dim} != query head_dim {head_dim}")
    if entries_indptr.shape != (batch + 1,) or entry_tier.shape != entry_row.shape:
        raise ValueError("entries_indptr must be [B + 1] and entry_tier / entry_row alike")
    if version != "v1" and (tier_indptr is None or tier_indptr.shape != (batch, 4)):
        raise ValueError(f"decode {version} needs tier_indptr [B, 4] (DecodeEntries.tier_indptr)")
    # v3 is v2 with the register-operand low-bit loop where both low-bit formats allow it
    # (2/4/8 bits: register_operand_slots), else v2's loop.
    key_slots, value_slots = register_operand_slots(lowbit.key_format), register_operand_slots(lowbit.value_format)
    register_operands = version == "v3" and key_slots is not None and value_slots is not None
    if version in ("v4", "v5"):
        formats = [lowbit.key_format, lowbit.value_format]
        formats += [guard.key_format] if isinstance(guard, PackedTables) else []
        if any(fmt.group_size < 16 or fmt.group_size & (fmt.group_size - 1) for fmt in formats):
            raise ValueError(f"decode {version} needs packed group sizes that are powers of two >= 16 "
                             "(tl.dot's smallest K, N)")
    if pair_order and version not in ("v4", "v5"):
        raise ValueError(f"pair_order is an option of v4 and v5, got {version}")
    if bias_register and not pair_order:
        raise ValueError("bias_register is an option of pair_order (the pairs' bias)")
    if in_place_values and not pair_order:
        raise ValueError("in_place_values is an option of pair_order (the value pairs, unshifted)")
    if lane_keys and not pair_order:
        raise ValueError("lane_keys is an option of pair_order (the key pairs, in lane order)")
    if pipelined_loads and version not in ("v4", "v5"):
        raise ValueError(f"pipelined_loads is an option of v4 and v5 (v2's is prefetch), got {version}")
    if block_g is not None and version != "v5":
        raise ValueError(f"block_g is an option of v5 (its packed dots' N), got {version}")
    if block_g is not None and (block_g < 8 or block_g & (block_g - 1) or block_g < q_heads // kv_heads):
        raise ValueError(f"block_g must be a power of two >= 8 and >= the {q_heads // kv_heads} queries per KV "
                         f"head, got {block_g}")
    if wide_offsets and version not in ("v4", "v5"):
        raise ValueError(f"wide_offsets is an option of v4 and v5 (v1-v3 always take 64-bit offsets), got {version}")
    if prefetch is not None and version in ("v4", "v5"):
        raise ValueError(f"{version}'s packed loops always prefetch; prefetch is an option of v2's")
    if prefetch and (version == "v1" or register_operands):
        raise ValueError("prefetch is an option of v2's low-bit loop")
    prefetch = version != "v1" and not register_operands if prefetch is None else prefetch
    if q.stride(-1) != 1 or staging.k.stride() != staging.v.stride() or staging.k.stride(-1) != 1:
        raise ValueError("q and the staging K/V tables need a contiguous last dimension and equal strides")
    if out is None:
        out = torch.empty((batch, q_heads, head_dim), dtype=torch.float32, device=q.device)
    elif (out.shape != (batch, q_heads, head_dim) or out.dtype not in _OUTPUT_DTYPES
          or out.stride(-1) != 1):
        raise ValueError(f"out must be fp32, bf16 or fp16 [{batch}, {q_heads}, {head_dim}] with a contiguous "
                         f"last dim, got {out.dtype} {tuple(out.shape)}")
    if batch == 0:
        return out

    tiers = _TierArgs.of(lowbit, guard, codes_view=_container_view if register_operands else None)
    lowbit_k, lowbit_k_strides, lowbit_v, lowbit_v_strides = (tiers.lowbit_k, tiers.lowbit_k_strides, tiers.lowbit_v,
                                                              tiers.lowbit_v_strides)
    guard_k, guard_v, guard_strides, guard_packed = tiers.guard_k, tiers.guard_v, tiers.guard_strides, tiers.guard_packed
    guard_bits, guard_group_size = tiers.guard_bits, tiers.guard_group_size

    query_group = q_heads // kv_heads
    # v3 writes two partial states per split: the bf16 tiers' and the low-bit tier's.
    partials = 2 * num_splits if register_operands else num_splits
    partial_out = torch.empty((batch, q_heads, partials, head_dim), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((batch, q_heads, partials), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    # Both split kernels take the same tables, strides and constants; they differ only in
    # how they find a split's entries (v1: indptr + per-entry tier; v2: tier ranges).
    if version == "v1":
        split_kernel = _decode_split_kernel
        entry_args = (entries_indptr, entry_tier, entry_row)
        entry_strides = ()
    else:
        # v3: v2 with REGISTER_OPERANDS; v5: v4 with TRANSPOSED
        split_kernel = _decode_split_kernel_v4 if version in ("v4", "v5") else _decode_split_kernel_v2
        entry_args = (tier_indptr, entry_row)
        entry_strides = (tier_indptr.stride(0), tier_indptr.stride(1))
    launch_options = {"num_warps": num_warps}
    if max_registers is not None:
        launch_options["maxnreg"] = max_registers
    dense_precision = "tf32" if dot_precision == "auto" else dot_precision
    # "bf16" is for the bf16 rows' dots; packed rows keep fp16 (bf16 would not hold v4's biased codes).
    packed_precision = "fp16" if dot_precision in ("auto", "bf16") else dot_precision
    if version in ("v4", "v5"):
        # Output slices must each lie inside one value group of every packed tier.
        value_groups = [lowbit.value_format.group_size] + ([guard_group_size] if guard_packed else [])
        launch_options.update(ACC_COLS=min(value_groups), PACKED_DOT_PRECISION=packed_precision,
                              TRANSPOSED=version == "v5", PAIR_ORDER=pair_order, BIAS_REGISTER=bias_register,
                              IN_PLACE_VALUES=in_place_values, LANE_KEYS=lane_keys,
                              PIPELINED_LOADS=pipelined_loads,
                              WIDE_OFFSETS=wide_offsets or _needs_wide_offsets(
                                  staging.k, staging.v, *lowbit_k, *lowbit_v, *guard_k, *guard_v),
                              code_bias=CODE_BIAS)
    elif version != "v1":
        launch_options.update(PREFETCH=prefetch, LOWBIT_DOT_PRECISION=packed_precision,
                              GUARD_DOT_PRECISION=packed_precision if guard_packed else dense_precision)
    if register_operands:
        launch_options.update(REGISTER_OPERANDS=True, KEY_SLOTS=key_slots, VALUE_SLOTS=value_slots,
                              PAIRED_ASM=os.environ.get("TRITON_INTERPRET", "0") != "1")
    if num_stages is not None:
        launch_options["num_stages"] = num_stages
    split_kernel[(batch, kv_heads, num_splits)](
        q,
        *entry_args,
        staging.k,
        staging.v,
        *lowbit_k,
        *lowbit_v,
        *guard_k,
        *guard_v,
        partial_out,
        partial_lse,
        scaling * _LOG2_E,
        q.stride(0),
        q.stride(1),
        *entry_strides,
        staging.k.stride(0),
        staging.k.stride(1),
        *lowbit_k_strides,
        *lowbit_v_strides,
        *guard_strides,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        QUERY_GROUP=query_group,
        HEAD_DIM=head_dim,
        num_splits=num_splits,
        KEY_BITS=lowbit.key_format.bits,
        KEY_GROUP_SIZE=lowbit.key_format.group_size,
        VALUE_BITS=lowbit.value_format.bits,
        VALUE_GROUP_SIZE=lowbit.value_format.group_size,
        GUARD_PACKED=guard_packed,
        GUARD_BITS=guard_bits,
        GUARD_GROUP_SIZE=guard_group_size,
        BLOCK_G=block_g or max(16, triton.next_power_of_2(query_group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        DOT_PRECISION=dense_precision,
        **launch_options,
    )
    _merge_splits_kernel[(batch, q_heads)](
        partial_out,
        partial_lse,
        out,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        out.stride(0),
        out.stride(1),
        partials,
        HEAD_DIM=head_dim,
        SPLITS_PER_STEP=_MERGE_SPLITS_PER_STEP,
        BLOCK_D=block_d,
        num_warps=1,
    )
    return out


def decode_attention_for_pool(
    pool,
    layer: int,
    q: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float,
    num_splits: int = 4,
    max_seq_len: int | None = None,
    max_entries: int | None = None,
    region_indptr: torch.Tensor | None = None,
    block_counts: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Entries of one layer of a CompressedKVPool + `decode_attention` (v2, from the
    builder's tier ranges, unless `version="v1"` is passed). With `region_indptr` (and
    `max_entries`: the entry arrays' size, `max_seq_len`: the grid bound)
    `decode_entries_in_regions` builds them (from this layer's `block_counts`, if given),
    else `decode_entries`. `layer` is the pool-local layer index; q must already be
    rotated (pool.rotate)."""
    if region_indptr is not None:
        if max_entries is None:
            raise ValueError("region_indptr needs max_entries = region_indptr[-1] (the sum of seq_lens)")
        if max_seq_len is None:
            raise ValueError("region_indptr needs max_seq_len (it bounds the builder's grid)")
        entries = decode_entries_in_regions(pool.location[layer], req_to_token, req_pool_indices, seq_lens,
                                            region_indptr, max_entries, max_seq_len, block_counts=block_counts)
    else:
        entries = decode_entries(pool.location[layer], req_to_token, req_pool_indices, seq_lens,
                                 max_seq_len, max_entries)
    staging, lowbit, guard = layer_tables(pool, layer)
    return decode_attention(q, entries.indptr, entries.tier, entries.row, staging, lowbit, guard,
                            scaling, num_splits, tier_indptr=entries.tier_indptr, **kwargs)
