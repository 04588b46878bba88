"""A debugging trace of what each request holds, per layer, as JSON lines (off by default).

Set SGLANG_KVC_TRACE=/path/file.jsonl in the server's environment to write one line per
request when its prompt has been compressed ("prompt") and when it is released ("release"):
for each layer, how many of its positions each tier holds, a hash of the held positions,
checksums of their dequantized K and V, and the largest row they use. Two servers given the
same requests (with the same `rid`s, e.g. `eval/tiny/serve_eval.py --trace`) can then be
compared request by request: the same kept positions but other K/V sums point at the reads
or at rows overwritten in between; other positions point at the selection or the shared
prefix. SGLANG_KVC_TRACE_RIDS=a,b traces only rids starting with a or b. It reads the device
(a sync per traced request): for diagnosis, never for serving.
"""

from __future__ import annotations

import json
import os

import torch

ENV = "SGLANG_KVC_TRACE"
# Optional: trace only requests whose rid starts with one of these comma-separated prefixes.
RIDS_ENV = "SGLANG_KVC_TRACE_RIDS"

# Positions hash: a sum of each held position's multiplicative hash (order-free, exact in int64).
_HASH_MULTIPLIER = 2654435761
_HASH_MODULUS = (1 << 31) - 1


def trace_path() -> str | None:
    return os.environ.get(ENV) or None


def request_state(pool, req_to_token: torch.Tensor, slot: int, seq_len: int) -> list[dict]:
    """Per layer, what request slot `slot` holds of its first `seq_len` positions."""
    from sglang_kvc.pool import Tier, row_of, tier_of

    tokens = req_to_token[slot, :seq_len].to(torch.int64)
    positions = torch.arange(seq_len, device=tokens.device, dtype=torch.int64)
    layers = []
    for layer in range(pool.layer_num):
        location = pool.location[layer, tokens]
        tiers = tier_of(location)
        k, v, held = pool.gather(layer, tokens, torch.float32)
        held_positions = positions[held]
        rows = row_of(location)[held]
        layers.append({
            "tiers": {tier.name.lower(): int((tiers == tier).sum()) for tier in Tier},
            "positions_hash": int((held_positions * _HASH_MULTIPLIER % _HASH_MODULUS).sum()),
            "k_sum": round(float(k[held].double().sum()), 3),
            "k_abs": round(float(k[held].double().abs().sum()), 3),
            "v_abs": round(float(v[held].double().abs().sum()), 3),
            "max_row": int(rows.max()) if rows.numel() else -1,
        })
    return layers


def trace_request(pool, req_to_token: torch.Tensor, slot: int, seq_len: int, rid: str, event: str) -> None:
    path = trace_path()
    if path is None:
        return
    prefixes = [prefix for prefix in os.environ.get(RIDS_ENV, "").split(",") if prefix]
    if prefixes and not any(str(rid).startswith(prefix) for prefix in prefixes):
        return
    record = {"rid": rid, "event": event, "seq_len": seq_len,
              "max_token": int(req_to_token[slot, :seq_len].max()) if seq_len else -1,
              "layers": request_state(pool, req_to_token, slot, seq_len)}
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")
