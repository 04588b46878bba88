"""Held K/V rows of listed entries, every tier dequantized into one bf16 buffer, in one launch.

Prefill attention over a cached prefix (`engine._extend_triton`) runs SGLang's extend kernel
on a transient bf16 copy of the prefix's held rows. Building that copy with torch (per tier:
a gather of codes and pairs, the unpacking, a `where` into the buffer) dispatched ~45
operators per layer, ~1,300 per pass: for a short extend on a cached prompt (a repeated
512-token prompt recomputes one token) host work that stock SGLang does not have
(`docs/kernels.md`, fourteenth session). This kernel reads each entry from its own tier
with the decode kernels' tile loaders (`decode_attention._load_tile`: every tier under its
own mask) and writes the rows in the buffer's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_kvc.kernels.decode_attention import (
    _GUARD,
    _LOWBIT,
    _STAGING,
    DecodeEntries,
    _load_tile,
    _TierArgs,
    layer_tables,
)

_BLOCK_N = 16  # entries per program


# One variant for every capacity, and for every batch size: the listed count is read from
# indptr[-1], whose alignment follows the batch size.
@triton.jit(do_not_specialize=["capacity"], do_not_specialize_on_alignment=["listed_end_ptr"])
def _gather_rows_kernel(
    entry_tier_ptr,  # [capacity] int8
    entry_row_ptr,  # [capacity] int32
    listed_end_ptr,  # the number of listed entries (DecodeEntries.indptr[-1]); slots past it are unspecified
    capacity,
    out_k_ptr,  # [capacity, Hkv, D], written in full (0 past the listed entries)
    out_v_ptr,
    staging_k_ptr,
    staging_v_ptr,
    lowbit_k_codes_ptr,
    lowbit_k_pairs_ptr,
    lowbit_v_codes_ptr,
    lowbit_v_pairs_ptr,
    guard_k_ptr,  # bf16 rows, or codes when GUARD_PACKED
    guard_k_pairs_ptr,
    guard_v_ptr,
    guard_v_pairs_ptr,
    stride_out_row,
    stride_out_head,
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
    KEY_BITS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_GROUP_SIZE: tl.constexpr,
    GUARD_PACKED: tl.constexpr,
    GUARD_BITS: tl.constexpr,
    GUARD_GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (block of BLOCK_N entries, KV head)."""
    kv_head = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_buffer = offs < capacity
    listed = in_buffer & (offs < tl.load(listed_end_ptr))
    tiers = tl.load(entry_tier_ptr + offs, mask=listed, other=0).to(tl.int32)
    rows = tl.load(entry_row_ptr + offs, mask=listed, other=0)
    is_staging, is_lowbit, is_guard = tiers == _STAGING, tiers == _LOWBIT, tiers == _GUARD
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    out_offsets = offs[:, None].to(tl.int64) * stride_out_row + kv_head * stride_out_head + dims[None, :]
    out_mask = in_buffer[:, None] & dim_mask[None, :]

    k = _load_tile(rows, kv_head, is_staging, is_lowbit, is_guard, dims, dim_mask,
                   staging_k_ptr, stride_staging_row, stride_staging_head,
                   lowbit_k_codes_ptr, lowbit_k_pairs_ptr, stride_lk_row, stride_lk_head,
                   stride_lk_pairs_row, stride_lk_pairs_head,
                   guard_k_ptr, guard_k_pairs_ptr, stride_guard_row, stride_guard_head,
                   stride_guard_pairs_row, stride_guard_pairs_head,
                   KEY_BITS, KEY_GROUP_SIZE, GUARD_PACKED, GUARD_BITS, GUARD_GROUP_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D)
    tl.store(out_k_ptr + out_offsets, k.to(out_k_ptr.dtype.element_ty), mask=out_mask)
    v = _load_tile(rows, kv_head, is_staging, is_lowbit, is_guard, dims, dim_mask,
                   staging_v_ptr, stride_staging_row, stride_staging_head,
                   lowbit_v_codes_ptr, lowbit_v_pairs_ptr, stride_lv_row, stride_lv_head,
                   stride_lv_pairs_row, stride_lv_pairs_head,
                   guard_v_ptr, guard_v_pairs_ptr, stride_guard_row, stride_guard_head,
                   stride_guard_pairs_row, stride_guard_pairs_head,
                   VALUE_BITS, VALUE_GROUP_SIZE, GUARD_PACKED, GUARD_BITS, GUARD_GROUP_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D)
    tl.store(out_v_ptr + out_offsets, v.to(out_v_ptr.dtype.element_ty), mask=out_mask)


def gather_held_rows(pool, layer: int, entries: DecodeEntries, capacity: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [capacity, kv_heads, head_dim] in `dtype` of a layer's listed entries (slot i
    holds entry i's row, dequantized if packed; 0 past `entries.indptr[-1]`), as
    `store.read` of each entry's tier would give them, up to fp32 rounding."""
    staging, lowbit, guard = layer_tables(pool, layer)
    head_dim, kv_heads = staging.head_dim, staging.k.shape[1]
    device = staging.k.device
    out_k = torch.empty((capacity, kv_heads, head_dim), dtype=dtype, device=device)
    out_v = torch.empty_like(out_k)
    if capacity == 0:
        return out_k, out_v
    if staging.k.stride() != staging.v.stride() or staging.k.stride(-1) != 1:
        raise ValueError("the staging K/V tables need equal strides and a contiguous last dimension")
    tiers = _TierArgs.of(lowbit, guard)
    _gather_rows_kernel[(triton.cdiv(capacity, _BLOCK_N), kv_heads)](
        entries.tier, entries.row, entries.indptr[-1:], capacity,
        out_k, out_v, staging.k, staging.v, *tiers.lowbit_k, *tiers.lowbit_v, *tiers.guard_k, *tiers.guard_v,
        out_k.stride(0), out_k.stride(1), staging.k.stride(0), staging.k.stride(1),
        *tiers.lowbit_k_strides, *tiers.lowbit_v_strides, *tiers.guard_strides,
        KEY_BITS=lowbit.key_format.bits, KEY_GROUP_SIZE=lowbit.key_format.group_size,
        VALUE_BITS=lowbit.value_format.bits, VALUE_GROUP_SIZE=lowbit.value_format.group_size,
        GUARD_PACKED=tiers.guard_packed, GUARD_BITS=tiers.guard_bits, GUARD_GROUP_SIZE=tiers.guard_group_size,
        HEAD_DIM=head_dim, BLOCK_N=_BLOCK_N, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out_k, out_v
