"""Insert into the bf16 staging tier in one launch: token i's K and V go to row
`staging_row[slots[i]]` of one layer's staging tables. The torch equivalent,

    rows = staging_row[slots]
    k_table[rows] = k.to(k_table.dtype)
    v_table[rows] = v.to(v_table.dtype)

is three launches (a gather and two scatters) per layer call, in every decode step's CUDA
graph and every prefill chunk. Padded decode slots are id 0, whose staging row 0 absorbs
their writes (which of them lands there does not matter: row 0 is never read as a token).

Grid: one program per token; it copies the token's [heads, head_dim] K and V rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_staged_kernel(
    k_ptr,  # [N, H, D] in the tables' dtype, last dim contiguous
    v_ptr,  # [N, H, D] in the tables' dtype, last dim contiguous
    slots_ptr,  # [N] int: the tokens' logical ids
    staging_row_ptr,  # [ids] int: each id's staging row
    k_table_ptr,  # [R, H, D] contiguous
    v_table_ptr,  # [R, H, D] contiguous
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    row = tl.load(staging_row_ptr + tl.load(slots_ptr + token).to(tl.int64)).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < HEADS) & (dims[None, :] < HEAD_DIM)
    table_offsets = row * (HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    tl.store(k_table_ptr + table_offsets, k, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
    tl.store(v_table_ptr + table_offsets, v, mask=mask)


def write_staged(slots: torch.Tensor, staging_row: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_table: torch.Tensor, v_table: torch.Tensor) -> None:
    """K and V [N, H, D] of the tokens `slots` into rows `staging_row[slots]` of `k_table` /
    `v_table` [R, H, D] (contiguous); one launch when K and V come in the tables' dtype."""
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] != slots.numel():
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [{slots.numel()}, H, D]")
    if k_table.shape[1:] != k.shape[1:] or v_table.shape != k_table.shape:
        raise ValueError(f"tables {tuple(k_table.shape)} / {tuple(v_table.shape)} do not fit rows {tuple(k.shape[1:])}")
    if not (k_table.is_contiguous() and v_table.is_contiguous()):
        raise ValueError("staging tables must be contiguous")
    if slots.numel() == 0:
        return
    # The model's K/V are in the staging dtype already; anything else is converted by torch
    # (round to nearest even, as the torch path does) so that the kernel only copies.
    k, v = k.to(k_table.dtype), v.to(v_table.dtype)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    heads, head_dim = k.shape[1], k.shape[2]
    _write_staged_kernel[(slots.numel(),)](
        k, v, slots, staging_row, k_table, v_table, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
