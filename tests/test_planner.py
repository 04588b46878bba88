"""Memory planner (sglang_kvc.planner): row sizes checked by hand for Qwen2.5-7B, pool sizing
against a byte budget, and the compression ratio."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_kvc.config import CompressionConfig, ConfigError, QuantizationConfig, SparsityConfig, load_config
from sglang_kvc.planner import KVPlan, ModelShape, RuntimeLimits, plan_for

REPO = Path(__file__).resolve().parents[1]
QWEN_CONFIG = REPO / "tests" / "data" / "qwen2.5-7b-instruct" / "config.json"
SHIPPED = ("qwen_8x", "qwen_8x_aggressive", "qwen_12x")
GIB = 2**30

# Qwen2.5-7B: 28 layers, 28 query heads over 4 KV heads, hidden 3584 -> head_dim 128.
QWEN = ModelShape(num_layers=28, kv_heads=4, head_dim=128, context_len=32768)
BF16_ROW = 2 * 4 * 128 * 2  # (K and V) x 4 heads x 128 channels x 2 bytes = 2048 B per layer
BF16_TOKEN = 28 * BF16_ROW  # 57,344 B per token over all layers


def shipped_plan(name: str, limits: RuntimeLimits | None = None) -> KVPlan:
    return plan_for(load_config(REPO / "configs" / f"{name}.yaml"), QWEN, limits)


def make_plan(
    retain=0.25, budget="uniform", key_bits=4, value_bits=4, group_size=32, guard_fraction=0.5, guard_bits=16
) -> KVPlan:
    config = CompressionConfig(
        sparsity=SparsityConfig(retain_ratio=retain, budget=budget),
        quantization=QuantizationConfig(
            key_bits=key_bits,
            value_bits=value_bits,
            group_size=group_size,
            guard_fraction=guard_fraction,
            guard_bits=guard_bits,
        ),
    )
    return plan_for(config, QWEN)


# ---- model shape -------------------------------------------------------------------------------


def test_qwen_shape_from_hf_config():
    assert ModelShape.from_hf_config(QWEN_CONFIG) == QWEN
    assert QWEN.bf16_bytes_per_token() == BF16_TOKEN == 57_344


@pytest.mark.parametrize("tp_size, kv_heads", [(1, 4), (2, 2), (4, 1), (8, 1)])
def test_kv_heads_per_tensor_parallel_rank(tp_size, kv_heads):
    assert ModelShape.from_hf_config(QWEN_CONFIG, tp_size=tp_size).kv_heads == kv_heads


def test_shape_with_explicit_head_dim_and_no_gqa(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 1024, "head_dim": 64}))
    assert ModelShape.from_hf_config(path) == ModelShape(4, 8, 64, 32768)


def test_plan_checks_the_model_shape():
    config = load_config(REPO / "configs" / "qwen_12x.yaml")  # group 64, Hadamard
    with pytest.raises(ConfigError, match="group_size=64"):
        plan_for(config, dataclasses.replace(QWEN, head_dim=96))


# ---- bytes per row, by hand --------------------------------------------------------------------


# Per KV head, one packed K or V is ceil(128 / codes_per_word) int32 words plus one fp16
# (scale, minimum) pair = 4 B per group:
#   2-bit: 16 codes/word -> 8 words = 32 B;   3-bit: 10 codes/word -> 13 words = 52 B
#   4-bit: 8 codes/word -> 16 words = 64 B;   8-bit: 4 codes/word -> 32 words = 128 B
#   group 32 -> 4 groups = 16 B;  group 64 -> 2 groups = 8 B;  group 128 -> 1 group = 4 B
# and a row holds K and V for all 4 KV heads.
@pytest.mark.parametrize(
    "name, codes, scales, lowbit",
    [
        # K 3-bit + V 2-bit, group 32: 4 x (52 + 32) = 336 codes, 4 x (16 + 16) = 128 scales.
        ("qwen_8x", 4 * (52 + 32), 4 * (16 + 16), 464),
        # K and V 2-bit, group 32: 4 x (32 + 32) = 256, 4 x (16 + 16) = 128.
        ("qwen_8x_aggressive", 4 * (32 + 32), 4 * (16 + 16), 384),
        # K and V 2-bit, group 64: 4 x (32 + 32) = 256, 4 x (8 + 8) = 64.
        ("qwen_12x", 4 * (32 + 32), 4 * (8 + 8), 320),
    ],
)
def test_shipped_row_bytes_by_hand(name, codes, scales, lowbit):
    plan = shipped_plan(name)
    assert codes + scales == lowbit
    assert plan.lowbit_row_bytes == lowbit
    assert plan.guard_row_bytes == BF16_ROW  # guard_bits 16: a bf16 row
    assert plan.staging_row_bytes == BF16_TOKEN  # a staging row spans all 28 layers
    per_layer = plan.report(32768, 110 * GIB)["bytes_per_token_per_layer"]
    assert per_layer == {
        "bf16": 2048, "lowbit": lowbit, "lowbit_codes": codes, "lowbit_scales": scales,
        "guard": 2048, "staging": 2048,
    }


@pytest.mark.parametrize(
    "key_bits, value_bits, group_size, guard_bits, lowbit, guard",
    [
        # 4-bit, group 128: 4 x 2 x (64 + 4) = 544.
        (4, 4, 128, 16, 544, 2048),
        # 8-bit K, 4-bit V, group 16 (8 groups = 32 B): 4 x ((128 + 32) + (64 + 32)) = 1024;
        # an 8-bit guard at group 16: 4 x 2 x (128 + 32) = 1280.
        (8, 4, 16, 8, 1024, 1280),
        # 3-bit K and V, group 64: 4 x 2 x (52 + 8) = 480; 8-bit guard: 4 x 2 x (128 + 8) = 1088.
        (3, 3, 64, 8, 480, 1088),
    ],
)
def test_other_formats_by_hand(key_bits, value_bits, group_size, guard_bits, lowbit, guard):
    plan = make_plan(key_bits=key_bits, value_bits=value_bits, group_size=group_size, guard_bits=guard_bits)
    assert plan.lowbit_row_bytes == lowbit
    assert plan.guard_row_bytes == guard


def test_metadata_and_staging_by_hand():
    plan = shipped_plan("qwen_8x")
    # Staging: one maximal context (32,768) + one prefill chunk (8,192) + every running
    # request's decode window and current token: 4,096 x (16 + 1) = 69,632 -> 110,592 rows,
    # each a bf16 token over all layers plus an int64 free-list entry.
    assert plan.staging_rows() == 32768 + 8192 + 4096 * 17 == 110_592
    assert plan.fixed_bytes() == 110_592 * (57_344 + 8) == 6_342_672_384
    meta = plan.report(32768, 110 * GIB)["metadata_bytes"]
    assert meta["location_map_per_token"] == 28 * 4
    assert meta["free_list_per_row"] == meta["logical_free_list_per_token"] == 8
    assert meta["staging_rows"] == 110_592 and meta["staging_fixed"] == 6_342_672_384
    smaller = shipped_plan("qwen_8x", RuntimeLimits(chunked_prefill_size=4096, max_running_requests=64))
    assert smaller.staging_rows() == 32768 + 4096 + 64 * 17


def test_bytes_per_logical_token_by_hand():
    # qwen_8x: the 28 retain ratios average 0.32, each kept row costs 60% bf16 (2048 B) and
    # 40% low-bit (464 B) plus an 8 B free-list entry: 0.6*2048 + 0.4*464 + 8 = 1422.4 B.
    # 28 * 0.32 * 1422.4 = 12,744.704, plus 112 B location map and 8 B logical free list.
    assert shipped_plan("qwen_8x").bytes_per_logical_token() == pytest.approx(12_864.704, abs=1e-6)
    # The spread over layers does not change the average cost.
    pyramid, uniform = make_plan(budget="pyramid"), make_plan(budget="uniform")
    assert pyramid.bytes_per_logical_token() == pytest.approx(uniform.bytes_per_logical_token(), rel=1e-12)


def test_prompt_bytes_by_hand():
    # Uniform retain 0.25 of 32,768 tokens = 8,192 rows per layer, half of them guarded
    # (4,096 bf16 rows of 2,048 B) and half 4-bit at group 32 (4,096 rows of 4 x 2 x (64 + 16) = 640 B).
    plan = make_plan(retain=0.25, guard_fraction=0.5)
    prompt = plan.prompt_bytes(32768)
    payload = 28 * (4096 * 2048 + 4096 * 640)
    metadata = 32768 * (28 * 4 + 8) + 28 * 8192 * 8  # location map + logical slot, row entries
    assert prompt == {
        "bf16": 32768 * 57_344,
        "payload": payload,
        "metadata": metadata,
        "compressed": payload + metadata,
        "guard_rows": 28 * 4096,
        "lowbit_rows": 28 * 4096,
    }
    assert plan.compression_ratio(32768) == pytest.approx(32768 * 57_344 / (payload + metadata), rel=1e-12)


def test_short_prompt_is_only_quantized():
    plan = make_plan(retain=0.1, guard_fraction=0.0)
    prompt = plan.prompt_bytes(200)  # below min_prompt_len 256: every token kept, all low-bit
    assert prompt["lowbit_rows"] == 28 * 200 and prompt["guard_rows"] == 0
    # 4-bit group 32 vs bf16 without any sparsity: 2048 / 640 = 3.2x before metadata.
    assert prompt["bf16"] / prompt["payload"] == pytest.approx(3.2)


# ---- pool sizing -------------------------------------------------------------------------------


def check_budget_fit(plan: KVPlan, budget_bytes: int) -> None:
    sizes = plan.sizes_for_budget(budget_bytes)
    n = sizes.logical_tokens
    assert sizes.total_bytes <= budget_bytes
    assert plan.sizes_for_tokens(n + 1).total_bytes > budget_bytes  # the next token would not fit
    # The total is what the rows cost: staging, kept rows, and per-logical-token metadata.
    lowbit, guard = sum(sizes.lowbit_rows), sum(sizes.guard_rows)
    assert sizes.total_bytes == (
        plan.fixed_bytes()
        + lowbit * (plan.lowbit_row_bytes + 8)
        + guard * (plan.guard_row_bytes + 8)
        + n * (28 * 4 + 8)
    )
    # Every layer has rows for its share of all n logical tokens, guard rows for their share.
    g = plan.config.quantization.guard_fraction
    for layer, ratio in enumerate(plan.layer_retain_ratios):
        kept = sizes.lowbit_rows[layer] + sizes.guard_rows[layer]
        assert kept == math.ceil(n * ratio)
        assert sizes.guard_rows[layer] == math.ceil(kept * g)
    assert sizes.staging_rows == plan.staging_rows()


@pytest.mark.parametrize("name", SHIPPED)
def test_sizes_for_budget_shipped_at_110_gib(name):
    check_budget_fit(shipped_plan(name), 110 * GIB)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(SHIPPED),
    budget_above_staging=st.integers(0, 200 * GIB),
)
def test_sizes_for_budget_fits_and_is_maximal(name, budget_above_staging):
    plan = shipped_plan(name)
    check_budget_fit(plan, plan.fixed_bytes() + 1 + budget_above_staging)


@settings(max_examples=100, deadline=None)
@given(
    retain=st.floats(0.01, 0.66),
    budget=st.sampled_from(["uniform", "pyramid"]),
    key_bits=st.sampled_from([2, 3, 4, 8]),
    value_bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([16, 32, 64, 128]),
    guard_fraction=st.floats(0.0, 1.0),
    guard_bits=st.sampled_from([8, 16]),
    budget_above_staging=st.integers(0, 50 * GIB),
)
def test_sizes_for_budget_any_config(
    retain, budget, key_bits, value_bits, group_size, guard_fraction, guard_bits, budget_above_staging
):
    plan = make_plan(retain, budget, key_bits, value_bits, group_size, guard_fraction, guard_bits)
    check_budget_fit(plan, plan.fixed_bytes() + 1 + budget_above_staging)


@pytest.mark.parametrize("short_by", [0, 1, 5 * GIB])
def test_budget_below_staging_is_a_clear_error(short_by):
    plan = shipped_plan("qwen_8x")
    with pytest.raises(ValueError, match="does not cover the bf16 staging tier") as info:
        plan.sizes_for_budget(plan.fixed_bytes() - short_by)
    message = str(info.value)
    assert "5.91 GiB" in message and "110592 rows" in message
    assert "--max-running-requests" in message
    with pytest.raises(ValueError, match="staging tier"):
        plan.report(32768, plan.fixed_bytes() - short_by)


def test_budget_just_above_staging_holds_no_token():
    plan = shipped_plan("qwen_8x")
    sizes = plan.sizes_for_budget(plan.fixed_bytes() + 1)
    assert sizes.logical_tokens == 0 and sizes.total_bytes == plan.fixed_bytes()


# ---- compression ratio -------------------------------------------------------------------------


def ratios(plans: list[KVPlan]) -> list[float]:
    return [p.compression_ratio(32768) for p in plans]


def strictly_increasing(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def test_ratio_grows_as_retain_shrinks():
    for budget in ("uniform", "pyramid"):
        plans = [make_plan(retain=r, budget=budget) for r in (0.66, 0.5, 0.32, 0.18, 0.12, 0.05)]
        assert strictly_increasing(ratios(plans))
        gains = [p.report(32768, 110 * GIB)["capacity_gain"] for p in plans]
        assert strictly_increasing(gains)


def test_ratio_grows_as_bits_shrink():
    bit_pairs = [(8, 8), (8, 4), (4, 4), (4, 3), (3, 3), (3, 2), (2, 2)]
    assert strictly_increasing(ratios([make_plan(key_bits=k, value_bits=v) for k, v in bit_pairs]))
    # Larger groups: fewer scale/minimum pairs.
    assert strictly_increasing(ratios([make_plan(key_bits=2, value_bits=2, group_size=g) for g in (16, 32, 64, 128)]))
    # Fewer guarded (bf16) rows, or an 8-bit guard instead of bf16.
    assert strictly_increasing(ratios([make_plan(guard_fraction=f) for f in (1.0, 0.6, 0.3, 0.0)]))
    assert make_plan(guard_bits=8).compression_ratio(32768) > make_plan(guard_bits=16).compression_ratio(32768)


@settings(max_examples=150, deadline=None)
@given(
    retain_pair=st.lists(st.floats(0.01, 0.66), min_size=2, max_size=2, unique=True).map(sorted),
    bits_pair=st.lists(st.sampled_from([2, 3, 4, 8]), min_size=2, max_size=2).map(sorted),
    guard_fraction=st.floats(0.0, 1.0),
    budget=st.sampled_from(["uniform", "pyramid"]),
    prompt_len=st.integers(256, 131072),
)
def test_ratio_never_drops_with_less_retain_or_fewer_bits(retain_pair, bits_pair, guard_fraction, budget, prompt_len):
    (low_retain, high_retain), (low_bits, high_bits) = retain_pair, bits_pair

    def ratio(retain, bits):
        plan = make_plan(retain, budget, bits, bits, 32, guard_fraction)
        return plan.compression_ratio(prompt_len)

    assert ratio(low_retain, high_bits) >= ratio(high_retain, high_bits)
    assert ratio(high_retain, low_bits) >= ratio(high_retain, high_bits)
    assert ratio(low_retain, low_bits) >= ratio(high_retain, high_bits)


@pytest.mark.parametrize("name", SHIPPED)
def test_report_agrees_with_the_planner(name):
    plan = shipped_plan(name)
    report = plan.report(32768, 110 * GIB)
    sizes = plan.sizes_for_budget(110 * GIB)
    assert report["logical_tokens_fit"] == sizes.logical_tokens
    assert report["bf16_tokens_fit"] == 110 * GIB // BF16_TOKEN == 2_059_702
    assert report["capacity_gain"] == sizes.logical_tokens / 2_059_702
    assert report["compression_ratio"] == plan.compression_ratio(32768)
    prompt = report["prompt"]
    assert report["payload_compression_ratio"] == prompt["bf16"] / prompt["payload"]
    assert prompt["compressed"] == prompt["payload"] + prompt["metadata"]
    assert json.loads(json.dumps(report)) == report
