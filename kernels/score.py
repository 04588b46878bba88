"""Observation-window scores without the attention matrix in memory.

`ObservationWindowScorer` (policy.py) needs, per KV head, the softmax attention that every
window query of the head's GQA group pays to each candidate key, summed over the queries:

    score[h, n] = sum over rows r of group h of softmax_n(q_r . k_n / (sqrt(D) * T))   (causal)

In torch that is a [kv_heads, group * W, N] fp32 tensor: 117 MB per layer call for a 32K
prompt of Qwen2.5-7B (W 32, group 7, 4 KV heads), 470 MB at 128K. Two launches here keep
only O(rows + N) in memory:

  1. `_row_stats_kernel`, grid (kv_head, block of rows, key split): each program walks its
     split of the keys once, keeping the running max and sum of exp2 of its rows' logits
     (flash-attention style); the splits' (max, sum) pairs are then merged (a few torch ops
     on [splits, rows]). Without the splits a 32K prompt of Qwen2.5-7B gave only
     4 heads x 7 row blocks = 28 programs, each walking all keys (H200, 2026-11-29: 0.90 ms
     per layer call against torch's 0.66 ms);
  2. `_key_scores_kernel`, grid (kv_head, block of keys): each program walks all rows of
     its head, forms p = exp2(logit - max) / sum with the row statistics, masks the causal
     part, and sums over rows into its keys' scores.

Rows are (query head of the group, window position) pairs; logits are kept in base 2.

Both kernels take several prompts at once (`window_scores_batched`: a prefill pass that
finishes many prompts scores all of them in these two launches, each prompt's queries
against its own keys only): the prompts' keys are concatenated and split by `key_starts`,
their query windows padded to one length (padding rows at position -1 see no key and add
nothing). `window_scores` is the one-prompt case.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from sglang_kvc.device_copy import to_device

_LOG2_E = 1.4426950408889634
# Row-statistics key splits (`window_scores(min_keys_per_split=2048)`): at least 32 blocks
# of 64 keys per program keep its loop long enough to hide the prologue; a 32K prompt of
# Qwen2.5-7B gets 4 x 7 x 16 = 448 programs, a few per SM of an H200. A prediction, not
# yet timed.
_MAX_KEY_SPLITS = 32


@triton.jit
def _logits_block(q_ptr, k_ptr, q_rows, row_mask, keys, key_mask, kv_head, dims, dim_mask,
                  stride_q_row, stride_k_token, stride_k_head, qk_scale, DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] base-2 logits of a block of rows against a block of keys.
    `window_scores` passes tf32 (the interpreter computes fp32): plenty to rank tokens, and
    an "ieee" fp32 dot spills at these tiles (eval/compile_kernels.py shows both)."""
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_row + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + keys[:, None].to(tl.int64) * stride_k_token + kv_head * stride_k_head + dims[None, :],
                mask=key_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def _visible(row_positions, key_positions, row_mask, key_mask):
    """Causal and bounds mask: a row sees keys at or before its own position."""
    return (row_mask[:, None] & key_mask[None, :]) & (key_positions[None, :] <= row_positions[:, None])


@triton.jit
def _row_block(row_positions_ptr, prompt, kv_head, row_start, ROWS_PER_HEAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """One block of a prompt's KV head's rows: (in-range mask, row indices into q, their
    positions). q holds [prompts, kv_heads, ROWS_PER_HEAD] rows, positions [prompts, ROWS_PER_HEAD]."""
    local_rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = local_rows < ROWS_PER_HEAD
    row_positions = tl.load(row_positions_ptr + prompt * ROWS_PER_HEAD + local_rows, mask=row_mask, other=0)
    q_rows = (prompt * tl.num_programs(0) + kv_head) * ROWS_PER_HEAD + local_rows
    return row_mask, q_rows, row_positions


# Split counts and the strides that follow the number of rows or keys vary from pass to pass;
# one compiled variant for all (Triton would specialize a value of 1 and multiples of 16,
# compiling again in the middle of a request whenever a pass brings a new class).
@triton.jit(do_not_specialize=["splits", "stride_stats_split"])
def _row_stats_kernel(
    q_ptr,  # [rows_total, D]: prompt p's rows of KV head h: (p * Hkv + h) * ROWS_PER_HEAD ... (group-major)
    row_positions_ptr,  # [prompts, ROWS_PER_HEAD] positions of a prompt's rows (the same for every head)
    k_ptr,  # [N, Hkv, D]: every prompt's keys, concatenated
    key_positions_ptr,  # [N]
    key_starts_ptr,  # [prompts + 1] int64: prompt p's keys are key_starts[p] .. key_starts[p + 1]
    row_max_ptr,  # [splits, rows_total] out, base 2
    row_sum_ptr,  # [splits, rows_total] out
    splits,  # per prompt; program axis 2 is prompt * splits + split
    keys_per_split,  # a multiple of BLOCK_N
    qk_scale,
    stride_q_row,
    stride_k_token,
    stride_k_head,
    stride_stats_split,
    ROWS_PER_HEAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    row_block = tl.program_id(1)
    prompt = tl.program_id(2) // splits
    split = tl.program_id(2) % splits
    row_mask, q_rows, row_positions = _row_block(row_positions_ptr, prompt, kv_head, row_block * BLOCK_M,
                                                 ROWS_PER_HEAD, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # This prompt's split of its keys (empty for a short prompt's later splits).
    split_start = tl.load(key_starts_ptr + prompt) + split * keys_per_split
    split_end = tl.minimum(split_start + keys_per_split, tl.load(key_starts_ptr + prompt + 1))
    for key_start in range(split_start, split_end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_mask = keys < split_end
        key_positions = tl.load(key_positions_ptr + keys, mask=key_mask, other=0)
        logits = _logits_block(q_ptr, k_ptr, q_rows, row_mask, keys, key_mask, kv_head, dims, dim_mask,
                               stride_q_row, stride_k_token, stride_k_head, qk_scale, DOT_PRECISION)
        logits = tl.where(_visible(row_positions, key_positions, row_mask, key_mask), logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # A row that has seen no visible key yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.math.exp2(running_max - shift) + tl.sum(tl.math.exp2(logits - shift[:, None]), 1)
        running_max = new_max
    tl.store(row_max_ptr + split * stride_stats_split + q_rows, running_max, mask=row_mask)
    tl.store(row_sum_ptr + split * stride_stats_split + q_rows, running_sum, mask=row_mask)


@triton.jit(do_not_specialize=["stride_scores_head"])
def _key_scores_kernel(
    q_ptr,
    row_positions_ptr,
    k_ptr,
    key_positions_ptr,
    key_starts_ptr,
    row_max_ptr,
    row_sum_ptr,
    scores_ptr,  # [Hkv, N] out, fp32
    qk_scale,
    stride_q_row,
    stride_k_token,
    stride_k_head,
    stride_scores_head,
    ROWS_PER_HEAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    key_block = tl.program_id(1)
    prompt = tl.program_id(2)
    keys = tl.load(key_starts_ptr + prompt) + key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_mask = keys < tl.load(key_starts_ptr + prompt + 1)
    key_positions = tl.load(key_positions_ptr + keys, mask=key_mask, other=0)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM

    scores = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in range(0, ROWS_PER_HEAD, BLOCK_M):
        row_mask, q_rows, row_positions = _row_block(row_positions_ptr, prompt, kv_head, row_start,
                                                     ROWS_PER_HEAD, BLOCK_M)
        row_max = tl.load(row_max_ptr + q_rows, mask=row_mask, other=0.0)
        row_sum = tl.load(row_sum_ptr + q_rows, mask=row_mask, other=1.0)
        logits = _logits_block(q_ptr, k_ptr, q_rows, row_mask, keys, key_mask, kv_head, dims, dim_mask,
                               stride_q_row, stride_k_token, stride_k_head, qk_scale, DOT_PRECISION)
        visible = _visible(row_positions, key_positions, row_mask, key_mask)
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
        probs = tl.math.exp2(logits - safe_max[:, None]) / safe_sum[:, None]
        scores += tl.sum(tl.where(visible, probs, 0.0), axis=0)
    tl.store(scores_ptr + kv_head * stride_scores_head + keys, scores, mask=key_mask)


def window_scores(
    window_queries: torch.Tensor,  # [W, q_heads, D]
    window_positions: torch.Tensor,  # [W]
    keys: torch.Tensor,  # [N, kv_heads, D]
    key_positions: torch.Tensor,  # [N]
    temperature: float = 1.0,
    **blocking,
) -> torch.Tensor:
    """[kv_heads, N] fp32: per KV head, the causal softmax attention of the window's queries
    (every query head of the group) to each key, summed over the queries; what
    `ObservationWindowScorer` computes before pooling, without the [rows, N] matrix."""
    if window_positions.shape != (window_queries.shape[0],) or key_positions.shape != (keys.shape[0],):
        raise ValueError("one position per window query and per key")
    return window_scores_batched(window_queries[None], window_positions[None], keys, key_positions, [keys.shape[0]],
                                 temperature, **blocking)


def window_scores_batched(
    window_queries: torch.Tensor,  # [prompts, W, q_heads, D]
    window_positions: torch.Tensor,  # [prompts, W]; -1 marks padding (a shorter prompt's window)
    keys: torch.Tensor,  # [N, kv_heads, D]: every prompt's keys, concatenated
    key_positions: torch.Tensor,  # [N]
    key_counts: list[int],  # per prompt, on the host
    temperature: float = 1.0,
    *,
    block_m: int = 32,
    block_n: int = 64,
    min_keys_per_split: int = 2048,
) -> torch.Tensor:
    """`window_scores` of several prompts in two launches: [kv_heads, N], each prompt's keys
    scored by its own window only."""
    prompts, window, q_heads, head_dim = window_queries.shape
    num_keys, kv_heads = keys.shape[0], keys.shape[1]
    if q_heads % kv_heads or keys.shape[2] != head_dim:
        raise ValueError(f"queries {tuple(window_queries.shape)} do not fit keys {tuple(keys.shape)}")
    if window_positions.shape != (prompts, window) or key_positions.shape != (num_keys,):
        raise ValueError("one position per window query and per key")
    if len(key_counts) != prompts or sum(key_counts) != num_keys:
        raise ValueError(f"key_counts {key_counts} do not split {num_keys} keys over {prompts} prompts")
    group = q_heads // kv_heads
    device = keys.device
    scores = torch.empty((kv_heads, num_keys), dtype=torch.float32, device=device)
    if num_keys == 0 or window == 0:
        return scores.zero_()
    # Rows of prompt p, KV head h: (query head h * group + g, window position w), g-major, contiguous.
    rows = window_queries.float().permute(0, 2, 1, 3).reshape(prompts * q_heads * window, head_dim).contiguous()
    rows_per_head = group * window
    row_positions = window_positions.to(device=device, dtype=torch.int64).repeat(1, group).contiguous()
    key_positions = key_positions.to(device=device, dtype=torch.int64).contiguous()
    key_starts = to_device([0, *itertools.accumulate(key_counts)], torch.int64, device)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    # Key splits of at least `min_keys_per_split` keys each, at most _MAX_KEY_SPLITS of them,
    # sized for the longest prompt.
    longest = max(key_counts)
    splits = max(1, min(_MAX_KEY_SPLITS, longest // min_keys_per_split))
    keys_per_split = triton.cdiv(triton.cdiv(longest, splits), block_n) * block_n
    splits = triton.cdiv(longest, keys_per_split)
    partial_max = torch.empty((splits, prompts * kv_heads * rows_per_head), dtype=torch.float32, device=device)
    partial_sum = torch.empty_like(partial_max)
    qk_scale = _LOG2_E / (head_dim**0.5 * temperature)
    block_d = triton.next_power_of_2(head_dim)
    common = dict(ROWS_PER_HEAD=rows_per_head, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  DOT_PRECISION="tf32")
    _row_stats_kernel[(kv_heads, triton.cdiv(rows_per_head, block_m), prompts * splits)](
        rows, row_positions, keys, key_positions, key_starts, partial_max, partial_sum, splits, keys_per_split,
        qk_scale, rows.stride(0), keys.stride(0), keys.stride(1), partial_max.stride(0), **common,
    )
    # Merge the splits: max of maxima, sums rescaled to it (a row no split saw stays -inf / 0).
    row_max = partial_max.amax(dim=0)
    shift = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    row_sum = (partial_sum * torch.exp2(partial_max - shift)).sum(dim=0)
    _key_scores_kernel[(kv_heads, triton.cdiv(longest, block_n), prompts)](
        rows, row_positions, keys, key_positions, key_starts, row_max, row_sum, scores, qk_scale,
        rows.stride(0), keys.stride(0), keys.stride(1), scores.stride(0), **common,
    )
    return scores
