"""kernels/gather_rows.py: every listed entry's K/V from its own tier, dequantized, in one launch
(the prefix buffer of prefill attention over a cached prefix). Against each tier's own read
(`store.read`, the torch reference) on the decode kernels' test pools: every tier's rows
poisoned where no token holds them, so a row read from the wrong tier shows up as NaN."""

from __future__ import annotations

import pytest
import torch
from test_decode_attention_kernel import MAX_CONTEXT, NUM_TOKENS, build_batch, build_pool

from sglang_kvc.kernels.decode_attention import TIER_STAGING, decode_entries
from sglang_kvc.kernels.gather_rows import gather_held_rows


@pytest.mark.parametrize(("key_bits", "value_bits", "group_size", "guard_bits"),
                         [(3, 2, 32, 16), (4, 2, 32, 8), (2, 2, 64, 16), (8, 4, 32, 8)],
                         ids=["K3V2 bf16 guard", "K4V2 8-bit guard", "K2V2 g64", "K8V4 8-bit guard"])
def test_gather_reads_each_entry_from_its_tier_and_zeros_the_rest(gen, device, key_bits, value_bits, group_size,
                                                                  guard_bits):
    pool = build_pool(gen, device, key_bits=key_bits, value_bits=value_bits, group_size=group_size,
                      guard_bits=guard_bits, layers=2)
    layer = 1
    req_to_token, req_pool_indices, seq_lens = build_batch([0, 33, 1, 7, 20, MAX_CONTEXT], gen, device)
    listed_slots = int(seq_lens.sum())
    capacity = listed_slots + 5  # the builder's arrays are larger than what it lists
    entries = decode_entries(pool.location[layer], req_to_token, req_pool_indices, seq_lens,
                             max_seq_len=MAX_CONTEXT, max_entries=capacity)
    listed = int(entries.indptr[-1])
    # Slots past the listed ones are unspecified: make them point at a staging row no token
    # holds (poisoned with NaN), which a read would carry into the output.
    location = pool.location[layer]
    held_staging_rows = set((location[(location & 7) == TIER_STAGING] >> 3).tolist())
    unheld_row = next(row for row in range(1, NUM_TOKENS + 1) if row not in held_staging_rows)
    entries.tier[listed:] = TIER_STAGING
    entries.row[listed:] = unheld_row

    k, v = gather_held_rows(pool, layer, entries, capacity, torch.float32)

    tiers, rows = entries.tier[:listed].long(), entries.row[:listed].long()
    expected_k = torch.zeros_like(k[:listed])
    expected_v = torch.zeros_like(v[:listed])
    for tier in (1, 2, 3):
        where = (tiers == tier).nonzero().squeeze(1)
        if where.numel():
            expected_k[where], expected_v[where] = pool.store(tier).read(layer, rows[where], torch.float32)
    assert listed > 0 and {1, 2, 3} <= set(tiers.tolist())
    torch.testing.assert_close(k[:listed], expected_k, rtol=1e-6, atol=1e-6 * pool.value_scale)
    torch.testing.assert_close(v[:listed], expected_v, rtol=1e-6, atol=1e-6 * pool.value_scale)
    assert (k[listed:] == 0).all() and (v[listed:] == 0).all()


def test_gather_of_nothing_is_empty(gen, device):
    pool = build_pool(gen, device, layers=1)
    entries = decode_entries(pool.location[0], *build_batch([0], gen, device), max_seq_len=1, max_entries=0)
    k, v = gather_held_rows(pool, 0, entries, 0, torch.float32)
    assert k.shape == v.shape == (0, pool.staging.k[0].shape[1], pool.staging.k[0].shape[2])
