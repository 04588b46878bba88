"""Reference attention over a request's retained tokens (torch; CPU or GPU).

Keys carry their original positions, so causality survives eviction: a query at
position p attends to every retained key at position <= p. GQA is handled by mapping
query head h to KV head h // group (any group size, e.g. Qwen2.5-7B's 7).
"""

from __future__ import annotations

import torch

# Logits of one query block are kept under this many fp32 elements (1 GiB).
_MAX_LOGITS_ELEMENTS = 1 << 28


def attend(
    q: torch.Tensor,  # [Tq, q_heads, D]
    q_positions: torch.Tensor,  # [Tq]
    k: torch.Tensor,  # [Tk, kv_heads, D]
    v: torch.Tensor,  # [Tk, kv_heads, Dv]
    k_positions: torch.Tensor,  # [Tk]
    scaling: float,
    logit_cap: float = 0.0,
) -> torch.Tensor:  # [Tq, q_heads, Dv], float32
    num_q, q_heads = q.shape[0], q.shape[1]
    kv_heads = k.shape[1]
    out = torch.zeros((num_q, q_heads, v.shape[-1]), dtype=torch.float32, device=q.device)
    if k.shape[0] == 0 or num_q == 0:
        return out
    group = q_heads // kv_heads
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Tk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Tk, Dv]
    block = max(1, min(num_q, _MAX_LOGITS_ELEMENTS // max(1, q_heads * k.shape[0])))
    for start in range(0, num_q, block):
        stop = min(num_q, start + block)
        qb = q[start:stop].float().transpose(0, 1)  # [Hq, B, D]
        logits = torch.bmm(qb, kf.transpose(1, 2)) * scaling  # [Hq, B, Tk]
        if logit_cap > 0:
            logits = logit_cap * torch.tanh(logits / logit_cap)
        future = k_positions.view(1, 1, -1) > q_positions[start:stop].view(1, -1, 1)
        logits.masked_fill_(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        out[start:stop] = torch.bmm(probs, vf).transpose(0, 1)
    return out
