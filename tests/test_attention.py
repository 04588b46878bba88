"""Attention over compressed + staged tokens against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_kvc.attention import attend
from sglang_kvc.config import config_from_dict
from sglang_kvc.engine import BatchInfo, CompressedAttention
from sglang_kvc.planner import ModelShape, RuntimeLimits, plan_for
from sglang_kvc.pool import CompressedKVPool, Tier, row_of, tier_of
from sglang_kvc.quant import PackedFormat, dequantize, quantize

HEADS, Q_HEADS, DIM, LAYERS = 2, 14, 32, 2  # GQA group of 7, as Qwen2.5-7B


class _Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


def build(raw_config: dict, tokens: int = 512, request_slots: int = 2):
    config = config_from_dict(raw_config)
    # Staging for one pass of every request slot's prompt (up to 32 tokens each beyond 2 slots).
    limits = RuntimeLimits(max(64, 32 * request_slots), max(4, request_slots))
    plan = plan_for(config, ModelShape(LAYERS, HEADS, DIM, 256), limits)
    pool = CompressedKVPool(tokens, 1, torch.bfloat16, HEADS, DIM, LAYERS, "cpu", plan=plan, sizes=plan.sizes_for_tokens(tokens))
    req_to_token = torch.zeros((request_slots, 256), dtype=torch.int32)
    return pool, CompressedAttention(pool, req_to_token), req_to_token


def prefill_then_decode(pool, engine, req_to_token, prompt_len, generator):
    """Prefill one prompt (it gets compressed), then one decode step; returns what the
    decode step saw: its query, the raw K/V of every token, and the engine output."""
    tokens = torch.arange(1, prompt_len + 2)
    req_to_token[1, : prompt_len + 1] = tokens.to(torch.int32)
    raw_k = torch.randn(prompt_len + 1, HEADS, DIM, generator=generator) * 2
    raw_v = torch.randn(prompt_len + 1, HEADS, DIM, generator=generator)
    prompt = tokens[:prompt_len]
    engine.begin(BatchInfo(False, [1], [prompt_len], [0], [prompt_len], [True], ["r"]), prompt)
    for layer in range(LAYERS):
        pool.set_kv_buffer(_Layer(layer), prompt, raw_k[:prompt_len], raw_v[:prompt_len])
        engine.extend(layer, torch.randn(prompt_len, Q_HEADS, DIM, generator=generator), DIM**-0.5)
    q = torch.randn(1, Q_HEADS, DIM, generator=generator)
    engine.begin(BatchInfo(True, [1], [prompt_len + 1], [prompt_len], [1], [False], ["r"]), tokens[prompt_len:])
    outputs = []
    for layer in range(LAYERS):
        pool.set_kv_buffer(_Layer(layer), tokens[prompt_len:], raw_k[prompt_len:], raw_v[prompt_len:])
        outputs.append(engine.decode(layer, q, DIM**-0.5))
    return tokens, q, raw_k, raw_v, outputs


def exact_attention(q, k, v):
    """Plain full attention in float64, GQA by repeating KV heads."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), v)


def test_decode_over_compressed_prefix_equals_attention_over_dequantized_retained_tokens(seeded):
    pool, engine, req_to_token = build(
        {
            "sparsity": {"retain_ratio": 0.25, "min_prompt_len": 8, "sink_tokens": 2, "recent_window": 4, "observation_window": 8},
            "quantization": {"key_bits": 3, "value_bits": 2, "group_size": 16, "guard_fraction": 0.25, "guard_bits": 8, "key_transform": "hadamard", "decode_window": 4},
        }
    )
    prompt_len = 97
    tokens, q, raw_k, raw_v, outputs = prefill_then_decode(pool, engine, req_to_token, prompt_len, seeded)
    rotation = pool.rotation.double()
    for layer in range(LAYERS):
        location = pool.location[layer, tokens]
        tiers, rows = tier_of(location), row_of(location)
        kept = (tiers == Tier.LOWBIT) | (tiers == Tier.GUARD) | (tiers == Tier.STAGING)
        assert 0 < int(kept.sum()) < prompt_len  # really sparsified, and the new token is kept
        # Independent dequantization of exactly what the pool stored for the kept tokens.
        keys, values = [], []
        for position in kept.nonzero().squeeze(1).tolist():
            tier, row = int(tiers[position]), int(rows[position])
            if tier == Tier.STAGING:  # bf16 copy of the (rotated) key
                keys.append(pool.staging.k[layer][row].double())
                values.append(pool.staging.v[layer][row].double())
                continue
            store = pool.lowbit if tier == Tier.LOWBIT else pool.guard
            keys.append(dequantize(store.k_codes[layer][row], store.k_scale_min[layer][row], store.key_format).double())
            values.append(dequantize(store.v_codes[layer][row], store.v_scale_min[layer][row], store.value_format).double())
        expected = exact_attention(q.double() @ rotation, torch.stack(keys), torch.stack(values))
        torch.testing.assert_close(outputs[layer].double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key_transform", ["none", "hadamard"])
def test_retain_all_at_8_bits_is_close_to_bf16_attention(seeded, key_transform):
    pool, engine, req_to_token = build(
        {
            "sparsity": {"retain_ratio": 1.0, "budget": "uniform", "min_prompt_len": 8},
            "quantization": {"key_bits": 8, "value_bits": 8, "group_size": 32, "key_transform": key_transform, "decode_window": 0},
        }
    )
    prompt_len = 80
    tokens, q, raw_k, raw_v, outputs = prefill_then_decode(pool, engine, req_to_token, prompt_len, seeded)
    # The whole prompt was quantized; the decode token stays staged until the next step.
    assert pool.staged_count == 1
    expected = exact_attention(q, raw_k.bfloat16().float(), raw_v.bfloat16().float())
    for layer in range(LAYERS):
        # 8-bit codes: each value is within half a step (group range / 255 / 2 ~ 0.01 for these
        # N(0,1) groups) of its bf16 original; key errors of the same size move the softmax
        # weights a little more, so allow 4x a value step. A wrong code or scale is off by ~1.
        torch.testing.assert_close(outputs[layer].double(), expected, rtol=0, atol=4e-2)
        assert (outputs[layer].double() - expected).abs().max() > 0  # it really went through the codes


def test_reference_attention_masks_the_future_and_handles_gqa(seeded):
    q = torch.randn(5, 7, 16, generator=seeded)
    k = torch.randn(9, 1, 16, generator=seeded)
    v = torch.randn(9, 1, 16, generator=seeded)
    k_positions = torch.tensor([0, 1, 2, 5, 6, 7, 9, 10, 11])  # gaps: evicted positions
    q_positions = torch.tensor([3, 6, 9, 11, 12])
    out = attend(q, q_positions, k, v, k_positions, 16**-0.5)
    for i, position in enumerate(q_positions.tolist()):
        visible = k_positions <= position
        expected = exact_attention(q[i : i + 1], k[visible], v[visible])
        torch.testing.assert_close(out[i : i + 1].double(), expected, rtol=1e-5, atol=1e-5)


def test_quantized_store_roundtrip_matches_the_reference_format(seeded):
    """The pool writes exactly what quant.quantize produces (the layout the kernels read)."""
    pool, engine, req_to_token = build({"quantization": {"key_bits": 4, "value_bits": 2, "group_size": 16}})
    x = torch.randn(6, HEADS, DIM, generator=seeded) * 3
    rows = pool.lowbit_free[0].alloc(6)
    pool.lowbit.write(0, rows, x, x)
    codes, scale_min = quantize(x, PackedFormat(4, DIM, 16))
    assert torch.equal(pool.lowbit.k_codes[0][rows], codes)
    assert torch.equal(pool.lowbit.k_scale_min[0][rows], scale_min)


def _prefill(pool, engine, req_to_token, prompts, passes, generator_seed):
    """Prefill `prompts` (lists of logical ids) into request slots 0, 1, ... with K/V and
    queries drawn per prompt from one seed, grouping the requests into extend passes as
    `passes` (lists of request indices) says. Returns each request's dequantized K/V per
    layer (None where evicted) for comparison."""
    generator = torch.Generator().manual_seed(generator_seed)
    drawn = []
    for slot, ids in enumerate(prompts):
        tokens = torch.tensor(ids)
        req_to_token[slot, : len(ids)] = tokens.to(torch.int32)
        drawn.append([
            (torch.randn(len(ids), HEADS, DIM, generator=generator), torch.randn(len(ids), HEADS, DIM, generator=generator),
             torch.randn(len(ids), Q_HEADS, DIM, generator=generator))
            for _ in range(LAYERS)
        ])
    for members in passes:
        lens = [len(prompts[i]) for i in members]
        batch = BatchInfo(False, list(members), lens, [0] * len(members), lens, [True] * len(members),
                          [f"r{i}" for i in members])
        loc = torch.cat([torch.tensor(prompts[i]) for i in members])
        engine.begin(batch, loc)
        for layer in range(LAYERS):
            k, v, q = (torch.cat([drawn[i][layer][part] for i in members]) for part in range(3))
            pool.set_kv_buffer(_Layer(layer), loc, k, v)
            engine.extend(layer, q, DIM**-0.5)
    held = []
    for ids in prompts:
        tokens = torch.tensor(ids)
        per_layer = []
        for layer in range(LAYERS):
            k, v, kept = pool.gather(layer, tokens, torch.float32)
            per_layer.append((tier_of(pool.location[layer, tokens]), k[kept], v[kept]))
        held.append(per_layer)
    return held


_ONE_PASS_CONFIG = {
    "sparsity": {"retain_ratio": 0.3, "min_prompt_len": 8, "sink_tokens": 2, "recent_window": 4,
                 "observation_window": 8, "pooling_kernel": 3},
    "quantization": {"key_bits": 4, "value_bits": 2, "group_size": 16, "guard_fraction": 0.25, "guard_bits": 8},
}


def test_requests_finishing_in_one_pass_are_compressed_as_if_alone():
    """The engine scores each finishing request with its own queries and budget and places
    them all with one pool call: the tiers, kept tokens and their stored K/V must be those of
    prefilling each request in a pass of its own."""
    prompts = [list(range(1, 71)), list(range(100, 133))]
    together = _prefill(*build(_ONE_PASS_CONFIG), prompts, [[0, 1]], generator_seed=3)
    alone = _prefill(*build(_ONE_PASS_CONFIG), prompts, [[0], [1]], generator_seed=3)
    _assert_same_compression(together, alone)


def test_a_pass_of_more_prompts_than_the_engine_remembers_compresses_every_one():
    """Per-request prefill state is bounded (aborted chunked requests leave it behind), but
    never for the requests of the current pass: a server batches dozens of short prompts."""
    from sglang_kvc.engine import _MAX_PREFILLS_REMEMBERED

    count = _MAX_PREFILLS_REMEMBERED + 4
    prompts = [list(range(1 + 30 * i, 25 + 30 * i)) for i in range(count)]
    pool_tokens = 2048
    together = _prefill(*build(_ONE_PASS_CONFIG, pool_tokens, count), prompts, [list(range(count))], generator_seed=5)
    alone = _prefill(*build(_ONE_PASS_CONFIG, pool_tokens, count), prompts, [[i] for i in range(count)],
                     generator_seed=5)
    _assert_same_compression(together, alone)


_UNGUARDED_CONFIG = {
    "sparsity": {"retain_ratio": 0.3, "min_prompt_len": 8, "sink_tokens": 2, "recent_window": 4,
                 "observation_window": 8, "pooling_kernel": 3},
    "quantization": {"key_bits": 4, "value_bits": 2, "group_size": 16, "guard_fraction": 0.0},
}


class _NoScores:
    """A scorer that fails the test if the engine asks it for anything."""

    def score(self, *args):
        raise AssertionError("scored a pass whose candidates are all kept unguarded")

    score_prompts = score


@pytest.mark.parametrize("raw_config, lengths", [(_UNGUARDED_CONFIG, [5, 7]), (_ONE_PASS_CONFIG, [2, 1])])
def test_a_pass_keeping_every_candidate_unguarded_seals_them_as_compressing_would(monkeypatch, raw_config, lengths):
    """Prompts with fewer candidates than `min_prompt_len` keep them all; with too few for a
    guarded one, the engine seals them to the low-bit tier without scoring. The tiers and the
    stored K/V must be what scoring, selecting and placing them gives, and every staging row
    must come back."""
    prompts = [list(range(1, 1 + lengths[0])), list(range(100, 100 + lengths[1]))]
    pool, engine, req_to_token = build(raw_config)
    engine.scorer = _NoScores()
    sealed = _prefill(pool, engine, req_to_token, prompts, [[0, 1]], generator_seed=4)
    assert engine.seal_candidates and pool.staged_count == 0
    assert pool.staging_free.available() == pool.staging_free.num_rows

    compressing_pool, compressing_engine, compressing_req_to_token = build(raw_config)
    monkeypatch.setattr(CompressedAttention, "_keeps_every_candidate_unguarded", lambda self: False)
    compressed = _prefill(compressing_pool, compressing_engine, compressing_req_to_token, prompts, [[0, 1]],
                          generator_seed=4)
    for request, (ours, theirs) in enumerate(zip(sealed, compressed)):
        for layer, ((tiers, k, v), (want_tiers, want_k, want_v)) in enumerate(zip(ours, theirs)):
            assert torch.equal(tiers, want_tiers) and (tiers == Tier.LOWBIT).all(), (request, layer)
            assert torch.equal(k, want_k) and torch.equal(v, want_v), (request, layer)


@pytest.mark.parametrize("lengths", [[5, 9], [3, 2]])
def test_a_pass_with_a_token_to_evict_or_guard_is_scored(lengths):
    """9 candidates reach `min_prompt_len` 8 (some are evicted); 3 candidates at guard
    fraction 0.25 guard one: either way the scores decide, so the pass compresses."""
    raw_config = _UNGUARDED_CONFIG if 9 in lengths else _ONE_PASS_CONFIG
    prompts = [list(range(1, 1 + lengths[0])), list(range(100, 100 + lengths[1]))]
    pool, engine, req_to_token = build(raw_config)
    held = _prefill(pool, engine, req_to_token, prompts, [[0, 1]], generator_seed=4)
    assert not engine.seal_candidates and pool.staged_count == 0
    tiers = torch.cat([tiers for request in held for tiers, _, _ in request])
    assert ((tiers == Tier.EVICTED) | (tiers == Tier.GUARD)).any()


def _assert_same_compression(together, alone):
    for request, (ours, theirs) in enumerate(zip(together, alone)):
        for layer, ((tiers, k, v), (want_tiers, want_k, want_v)) in enumerate(zip(ours, theirs)):
            assert torch.equal(tiers, want_tiers), (request, layer)
            assert (tiers == Tier.EVICTED).any() and (tiers == Tier.GUARD).any() and (tiers == Tier.LOWBIT).any()
            assert torch.equal(k, want_k) and torch.equal(v, want_v), (request, layer)
