"""Insert kernel: quantize K or V rows into a PackedStore layer table in one launch.

`quantize_into(x, rows, codes_table, scale_min_table, fmt)` is the fused equivalent of

    codes, scale_min = quant.quantize(x, fmt)
    codes_table[rows], scale_min_table[rows] = codes, scale_min

and matches it bit for bit: the group minimum and maximum are taken in fp32, the
minimum and the scale are rounded to fp16 as stored, and every code is computed against
those stored values with an IEEE division and round-half-to-even, as torch does.

Grid: one program per (token, KV head). A program sees the token's `head_dim` values of
one head twice, in two register layouts of the same (L1-resident) data:

    group layout  [groups, group_size]         -> per-group min / max, scale, minimum
    word layout   [words, codes_per_word]      -> codes, OR-ed into int32 words

With 3-bit codes (10 per word) a word can span two groups, so the per-group scale and
minimum are broadcast to the word layout through a one-hot [words, codes, groups]
selection (a few thousand elements at most: head_dim 256, group size 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_kvc.quant import SCALE_DTYPE, PackedFormat


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _round_half_to_even(y):
    """torch.round (ties to even) for 0 <= y < 2**23. libdevice.rint would do, but the
    Triton interpreter has no libdevice."""
    floor = tl.floor(y)
    fraction = y - floor  # exact in this range
    floor_is_odd = (floor.to(tl.int32) & 1) == 1
    round_up = (fraction > 0.5) | ((fraction == 0.5) & floor_is_odd)
    return floor + round_up.to(tl.float32)


@triton.jit
def _quantize_into_kernel(
    x_ptr,  # [N, H, D] float (bf16 / fp16 / fp32), any strides
    rows_ptr,  # [N] int64 destination rows
    codes_ptr,  # [rows, H, WORDS] int32, last dim contiguous
    scale_min_ptr,  # [rows, H, GROUPS, 2] fp16, last dim contiguous
    stride_x_token,
    stride_x_head,
    stride_x_dim,
    stride_codes_row,
    stride_codes_head,
    stride_sm_row,
    stride_sm_head,
    stride_sm_group,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    WORDS: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    BLOCK_CODES: tl.constexpr,  # next power of two >= codes per word
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_GROUP_SIZE: tl.constexpr,
):
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    MAX_CODE: tl.constexpr = (1 << BITS) - 1

    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    x_base = x_ptr + token * stride_x_token + head * stride_x_head
    row = tl.load(rows_ptr + token).to(tl.int64)

    # ---- group layout: per-group (scale, minimum), exactly as quant.quantize ------------
    offs_group = tl.arange(0, BLOCK_GROUPS)
    offs_in_group = tl.arange(0, BLOCK_GROUP_SIZE)
    group_mask = offs_group < GROUPS
    grouped_mask = group_mask[:, None] & (offs_in_group[None, :] < GROUP_SIZE)
    grouped_dims = offs_group[:, None] * GROUP_SIZE + offs_in_group[None, :]
    grouped = tl.load(x_base + grouped_dims * stride_x_dim, mask=grouped_mask, other=0.0).to(tl.float32)
    minimum = tl.min(tl.where(grouped_mask, grouped, float("inf")), axis=1)
    maximum = tl.max(tl.where(grouped_mask, grouped, float("-inf")), axis=1)
    # Padding groups (GROUPS not a power of two) get 0, not inf - inf.
    minimum = tl.where(group_mask, minimum, 0.0)
    maximum = tl.where(group_mask, maximum, 0.0)
    minimum16 = minimum.to(tl.float16)  # round to nearest even, like torch's .to(fp16)
    scale16 = tl.math.div_rn(maximum - minimum16.to(tl.float32), MAX_CODE * 1.0).to(tl.float16)
    # As in quant.quantize, a scale <= 0 (a constant group, or one whose minimum fp16
    # rounded above its maximum) divides by 1: its codes are 0 and dequantize to the minimum.
    safe_scale = tl.where(scale16.to(tl.float32) > 0, scale16.to(tl.float32), 1.0)

    sm_base = scale_min_ptr + row * stride_sm_row + head * stride_sm_head + offs_group * stride_sm_group
    tl.store(sm_base, scale16, mask=group_mask)
    tl.store(sm_base + 1, minimum16, mask=group_mask)

    # ---- word layout: code j lives in word j // CODES_PER_WORD, slot j % CODES_PER_WORD --
    offs_word = tl.arange(0, BLOCK_WORDS)
    offs_code = tl.arange(0, BLOCK_CODES)
    dims = offs_word[:, None] * CODES_PER_WORD + offs_code[None, :]
    dim_mask = (offs_code[None, :] < CODES_PER_WORD) & (dims < HEAD_DIM)
    x = tl.load(x_base + dims * stride_x_dim, mask=dim_mask, other=0.0).to(tl.float32)

    # Broadcast each group's values to its dims (one-hot select; exact, one nonzero term).
    in_group = (dims // GROUP_SIZE)[:, :, None] == offs_group[None, None, :]
    dim_minimum = tl.sum(tl.where(in_group, minimum16.to(tl.float32)[None, None, :], 0.0), axis=2)
    dim_scale = tl.sum(tl.where(in_group, safe_scale[None, None, :], 0.0), axis=2)

    dim_scale = tl.where(dim_mask, dim_scale, 1.0)  # padding dims belong to no group
    scaled = tl.math.div_rn(x - dim_minimum, dim_scale)
    # Clamping before rounding gives the same code as torch's round-then-clamp.
    scaled = tl.minimum(tl.maximum(scaled, 0.0), MAX_CODE * 1.0)
    codes = _round_half_to_even(scaled).to(tl.int32)
    codes = tl.where(dim_mask, codes, 0)
    # Padding slots (3-bit: slots 10..15) would shift by >= 32, which is undefined.
    shift = tl.where(offs_code < CODES_PER_WORD, offs_code * BITS, 0)
    shifted = codes << shift[None, :]
    # Codes occupy disjoint bits of their word, so OR packs them (no signed overflow).
    words = tl.reduce(shifted, 1, _bitwise_or)
    codes_base = codes_ptr + row * stride_codes_row + head * stride_codes_head
    tl.store(codes_base + offs_word, words, mask=offs_word < WORDS)


def quantize_into(
    x: torch.Tensor,
    rows: torch.Tensor,
    codes_table: torch.Tensor,
    scale_min_table: torch.Tensor,
    fmt: PackedFormat,
) -> None:
    """Quantize `x` [N, H, head_dim] (bf16/fp16/fp32, any strides) and write token i's
    codes and (scale, minimum) pairs to row `rows[i]` of one PackedStore layer table:
    `codes_table` [R, H, fmt.words] int32 and `scale_min_table` [R, H, fmt.groups, 2] fp16."""
    if x.dim() != 3 or x.shape[-1] != fmt.head_dim:
        raise ValueError(f"x must be [N, H, {fmt.head_dim}], got {tuple(x.shape)}")
    num_tokens, heads = x.shape[0], x.shape[1]
    if rows.shape != (num_tokens,):
        raise ValueError(f"rows must be [{num_tokens}], got {tuple(rows.shape)}")
    if codes_table.dtype != torch.int32 or codes_table.shape[1:] != (heads, fmt.words):
        raise ValueError(f"codes_table must be int32 [R, {heads}, {fmt.words}], got "
                         f"{codes_table.dtype} {tuple(codes_table.shape)}")
    if scale_min_table.dtype != SCALE_DTYPE or scale_min_table.shape[1:] != (heads, fmt.groups, 2):
        raise ValueError(f"scale_min_table must be fp16 [R, {heads}, {fmt.groups}, 2], got "
                         f"{scale_min_table.dtype} {tuple(scale_min_table.shape)}")
    if codes_table.stride(-1) != 1 or scale_min_table.stride(-1) != 1:
        raise ValueError("the last dimension of both tables must be contiguous")
    if not (x.device == rows.device == codes_table.device == scale_min_table.device):
        raise ValueError("x, rows and the tables must be on one device")
    if num_tokens == 0:
        return
    rows = rows.to(torch.int64)
    _quantize_into_kernel[(num_tokens, heads)](
        x,
        rows,
        codes_table,
        scale_min_table,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        codes_table.stride(0),
        codes_table.stride(1),
        scale_min_table.stride(0),
        scale_min_table.stride(1),
        scale_min_table.stride(2),
        HEAD_DIM=fmt.head_dim,
        BITS=fmt.bits,
        GROUP_SIZE=fmt.group_size,
        WORDS=fmt.words,
        GROUPS=fmt.groups,
        BLOCK_WORDS=triton.next_power_of_2(fmt.words),
        BLOCK_CODES=triton.next_power_of_2(fmt.codes_per_word),
        BLOCK_GROUPS=triton.next_power_of_2(fmt.groups),
        BLOCK_GROUP_SIZE=triton.next_power_of_2(fmt.group_size),
        num_warps=1 if fmt.head_dim <= 128 else 2,
    )


def write_packed(store, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Kernel version of `PackedStore.write`: two launches (K and V formats may differ)."""
    quantize_into(k, rows, store.k_codes[layer], store.k_scale_min[layer], store.key_format)
    quantize_into(v, rows, store.v_codes[layer], store.v_scale_min[layer], store.value_format)
