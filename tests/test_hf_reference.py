"""The transformers reference path (`hf_reference.py`) and `sglang-kvc demo`, on tiny random
Qwen2 models built here (2 layers, hidden 64, 4 query heads, 2 KV heads, head_dim 16, vocab 128)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from sglang_kvc import demo
from sglang_kvc.cli import main as cli_main
from sglang_kvc.config import CompressionConfig, config_from_dict
from sglang_kvc.context_queries import context_query_positions
from sglang_kvc.hf_reference import (
    CompressedCache,
    TokenTier,
    answer_after_prefix,
    generate_with_cache,
    model_shape,
    prefill_cache,
)
from sglang_kvc.planner import FREE_LIST_ENTRY_BYTES, LOCATION_BYTES
from sglang_kvc.quant import PackedFormat, dequantize, hadamard_matrix, quantize

HEAD_DIM = 16


def tiny_config(attn_implementation: str = "eager") -> Qwen2Config:
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        initializer_range=0.1,  # larger than the default 0.02, so attention is not flat
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_model(seed: int = 0, attn_implementation: str = "eager") -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config(attn_implementation)).eval()


def prompt_ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def compression(**sections) -> CompressionConfig:
    """A validated config: defaults, group size 16 (head_dim 16), then `sections` overrides."""
    raw = {"name": "test", "sparsity": {}, "quantization": {"group_size": 16}}
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw)


COMPRESSING = dict(
    sparsity=dict(
        retain_ratio=0.25,
        budget="pyramid",
        pyramid_slope=0.5,
        observation_window=8,
        sink_tokens=4,
        recent_window=8,
        pooling_kernel=7,
        min_prompt_len=64,
    ),
    quantization=dict(
        key_bits=4, value_bits=2, guard_fraction=0.5, guard_bits=8, key_transform="hadamard", decode_window=3
    ),
)


@torch.no_grad()
def teacher_forced_logits(model, ids: torch.Tensor, continuation: list[int], cache) -> torch.Tensor:
    """Last-position logits after the prompt and after each continuation token but the last."""
    logits = [model(input_ids=ids, past_key_values=cache).logits[0, -1]]
    for token in continuation[:-1]:
        logits.append(model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits[0, -1])
    return torch.stack(logits).float()


def pool_readback(x: torch.Tensor, bits: int, rotate: bool) -> torch.Tensor:
    """What the SGLang pool reads back for bf16-staged `x` [..., head_dim]: codes of (H x) in
    bf16, dequantized and rotated back (the spec the cache must follow)."""
    fmt = PackedFormat(bits, HEAD_DIM, 16)
    h = hadamard_matrix(HEAD_DIM, "cpu")
    staged = x.to(torch.bfloat16).float()
    if rotate:
        staged = (staged @ h).to(torch.bfloat16).float()
    restored = dequantize(*quantize(staged, fmt), fmt)
    return restored @ h if rotate else restored


# ---- (a) near-lossless settings stay close to the full cache -------------------------------------


@pytest.mark.parametrize("key_transform", ["none", "hadamard"])
def test_retain_all_at_8_bits_stays_close_to_the_full_cache(key_transform):
    model, ids, steps = tiny_model(), prompt_ids(200), 12
    full = generate_with_cache(model, ids, None, steps)

    def config(bits: int):
        return compression(
            sparsity=dict(retain_ratio=1.0, budget="uniform", min_prompt_len=0),
            quantization=dict(key_bits=bits, value_bits=bits, key_transform=key_transform, decode_window=2),
        )

    # Bound: 8-bit codes per 16 channels err by at most (max-min)/510 of a group's range
    # (+ fp16 rounding of scale and minimum), the bf16 tiers by 2**-9 relative: both ~0.2%
    # of each K/V entry. Through two layers and the LM head that moved the logits by
    # 1-2.5% of their spread over 5 seeds (bf16 alone ~1%); 5% leaves room, and 4-bit
    # codes (16x coarser steps, 20-40% here) must break it, so the bound still discriminates.
    bound = 0.05 * float(full.step_logits.std())
    cache = CompressedCache(config(8), model)
    compressed_logits = teacher_forced_logits(model, ids, full.token_ids, cache)
    assert float((compressed_logits - full.step_logits).abs().max()) <= bound
    # Everything is 8-bit except the decode_window=2 newest decode tokens.
    assert all(layer.count(TokenTier.LOWBIT) == layer.positions.numel() - 2 for layer in cache.layers)
    coarse = teacher_forced_logits(model, ids, full.token_ids, CompressedCache(config(4), model))
    assert float((coarse - full.step_logits).abs().max()) > bound

    # Greedy decoding follows the full cache until a step whose top-2 margin is within
    # twice the bound (a near-tie that quantization may legitimately flip).
    greedy = generate_with_cache(model, ids, config(8), steps)
    top2 = full.step_logits.topk(2, dim=-1).values
    checked = 0
    for step, margin in enumerate((top2[:, 0] - top2[:, 1]).tolist()):
        if margin <= 2 * bound:
            break
        assert greedy.token_ids[step] == full.token_ids[step]
        checked += 1
    assert checked >= 1


# ---- (b) budgets, forced tokens, tiers, decode window ----------------------------------------------


@pytest.mark.parametrize("guard_bits", [8, 16])
@torch.no_grad()
def test_each_layer_keeps_its_budget_and_decode_tokens_leave_staging(guard_bits):
    # bf16, as SGLang serves: the full cache's K/V are then exactly what the compressed
    # cache saw (in fp32, layer 1's inputs would differ by the bf16 staging of layer 0).
    model, num_prompt = tiny_model().to(torch.bfloat16), 200
    config = compression(
        sparsity=COMPRESSING["sparsity"], quantization={**COMPRESSING["quantization"], "guard_bits": guard_bits}
    )
    ids = prompt_ids(num_prompt)
    cache = CompressedCache(config, model)
    logits = model(input_ids=ids, past_key_values=cache).logits
    reference = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=reference)

    sinks = set(range(config.sparsity.sink_tokens))
    recent = set(range(num_prompt - config.sparsity.recent_window, num_prompt))
    retain = config.layer_retain_ratios(2)
    budgets = [config.layer_budget(r, num_prompt) for r in retain]
    assert budgets[0] > budgets[1] > len(sinks | recent)  # pyramid, and really compressing
    for layer, budget, full_layer in zip(cache.layers, budgets, reference.layers):
        positions = layer.positions.tolist()
        assert len(positions) == len(set(positions)) == budget == layer.keys.shape[-2] == layer.values.shape[-2]
        assert sinks | recent <= set(positions)
        assert layer.count(TokenTier.GUARD) == config.guard_count(budget)
        assert layer.count(TokenTier.LOWBIT) == budget - config.guard_count(budget)
        # Stored K/V are the pool's read-back of the original (post-RoPE) keys and values.
        original_k = full_layer.keys[0].transpose(0, 1)[layer.positions]  # [kept, heads, dim]
        original_v = full_layer.values[0].transpose(0, 1)[layer.positions]
        stored_k, stored_v = layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)

        def check(stored, original, bits, rotate):
            assert torch.equal(stored, pool_readback(original, bits, rotate).to(stored.dtype))

        low, guard = layer.tiers == TokenTier.LOWBIT, layer.tiers == TokenTier.GUARD
        check(stored_k[low], original_k[low], 4, rotate=True)
        check(stored_v[low], original_v[low], 2, rotate=False)
        if guard_bits == 16:
            assert torch.equal(stored_k[guard], original_k[guard])
            assert torch.equal(stored_v[guard], original_v[guard])
        else:
            check(stored_k[guard], original_k[guard], 8, rotate=True)
            check(stored_v[guard], original_v[guard], 8, rotate=False)
        # The guard holds the highest-scored kept tokens.
        scores = layer.prompt_scores[layer.positions]
        assert float(scores[guard].min()) >= float(scores[low].max())

    window = config.quantization.decode_window
    token = int(logits[0, -1].argmax())
    prompt_tiers = [layer.tiers.clone() for layer in cache.layers]
    for step in range(window + 3):
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits
        token = int(logits[0, -1].argmax())
        newest = num_prompt + step
        assert cache.get_seq_length() == newest + 1
        for layer, budget, before in zip(cache.layers, budgets, prompt_tiers):
            assert torch.equal(layer.tiers[:budget], before)  # prompt tokens never move again
            decode_positions = layer.positions[budget:].tolist()
            assert decode_positions == list(range(num_prompt, newest + 1))
            expected = [
                TokenTier.LOWBIT if newest - p >= window else TokenTier.STAGING for p in decode_positions
            ]
            assert layer.tiers[budget:].tolist() == expected


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_model_generate_matches_the_explicit_decode_loop(attn_implementation):
    model, ids = tiny_model(attn_implementation=attn_implementation), prompt_ids(160)
    config = compression(**COMPRESSING)
    loop = generate_with_cache(model, ids, config, 8)
    cache = CompressedCache(config, model)
    # An explicit all-ones mask: otherwise generate() masks prompt tokens equal to the pad id.
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False, max_new_tokens=8
    )
    assert out[0, ids.shape[1] :].tolist() == loop.token_ids
    assert cache.kept_tokens() == loop.cache.kept_tokens()
    assert len(set(cache.kept_tokens())) == 2  # pyramid: the layers hold different lengths


@torch.no_grad()
def test_a_later_request_on_a_full_prefix_answers_as_the_whole_prompt_would():
    # fp32: the prompt in one forward and the same tokens one per forward then agree closely.
    model, prefix, rest = tiny_model(), prompt_ids(150), prompt_ids(6, seed=2)
    whole = generate_with_cache(model, torch.cat((prefix, rest), dim=1), None, 8)
    cache = prefill_cache(model, prefix, None)
    later = answer_after_prefix(model, cache, rest, 8)
    assert later.token_ids == whole.token_ids
    torch.testing.assert_close(later.step_logits, whole.step_logits, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 150  # the prefix cache is left as it was


def test_later_requests_continue_the_compressed_prefix_and_leave_it_unchanged():
    model, prefix = tiny_model().to(torch.bfloat16), prompt_ids(200)
    config = compression(**COMPRESSING)
    cache = prefill_cache(model, prefix, config)
    kept = cache.kept_tokens()
    assert kept == [config.layer_budget(r, 200) for r in config.layer_retain_ratios(2)]
    positions = [layer.positions.clone() for layer in cache.layers]
    first = answer_after_prefix(model, cache, prompt_ids(5, seed=3), 6)
    second = answer_after_prefix(model, cache, prompt_ids(5, seed=4), 6)
    assert cache.kept_tokens() == kept and cache.get_seq_length() == 200
    assert all(torch.equal(layer.positions, before) for layer, before in zip(cache.layers, positions))
    for result in (first, second):
        # the prefix's kept tokens, then the 5 continuation tokens and the decoded ones but the last
        assert result.cache.kept_tokens() == [n + 5 + len(result.token_ids) - 1 for n in kept]
        assert result.cache.get_seq_length() == 200 + 5 + len(result.token_ids) - 1
    # each request sees its own continuation, not the other's
    assert first.step_logits.shape[0] == 6 and not torch.equal(first.step_logits[0], second.step_logits[0])


def test_window_queries_are_the_queries_the_model_attends_with():
    """With temperature 1 and no pooling the scores are the attention probabilities of the
    prompt's last W queries, summed over heads: eager attention reports those directly."""
    model, ids = tiny_model(), prompt_ids(120)
    config = compression(sparsity=dict(observation_window=8, pooling_kernel=1, min_prompt_len=0))
    cache = CompressedCache(config, model)
    attentions = model(input_ids=ids, past_key_values=cache, output_attentions=True).attentions
    for layer, probs in zip(cache.layers, attentions):
        torch.testing.assert_close(layer.prompt_scores, probs[0, :, -8:, :].sum(dim=(0, 1)))


@torch.no_grad()
def test_context_mode_scores_with_the_sampled_queries_the_model_attends_with():
    """`scoring: context`: the scores are the attention probabilities of the queries at
    `context_query_positions(0, N, W)` (here W 8 -> 16 queries at most: stride 8 for 120
    tokens), summed over heads and those queries, divided per key by how many of them see it;
    the keys after the last sampled query (seen by none) rank first (+inf)."""
    model, ids = tiny_model(), prompt_ids(120)
    config = compression(sparsity=dict(observation_window=8, pooling_kernel=1, min_prompt_len=0, scoring="context"))
    sampled = list(context_query_positions(0, 120, 8))
    assert sampled == list(range(0, 120, 8))
    cache = CompressedCache(config, model)
    attentions = model(input_ids=ids, past_key_values=cache, output_attentions=True).attentions
    seen_by = (torch.tensor(sampled).view(1, -1) >= torch.arange(120).view(-1, 1)).sum(dim=1)
    for layer, probs in zip(cache.layers, attentions):
        expected = probs[0, :, sampled, :].sum(dim=(0, 1)) / seen_by.clamp(min=1)
        expected[sampled[-1] + 1 :] = float("inf")
        torch.testing.assert_close(layer.prompt_scores, expected)
        # ... and not what the last W queries would give (window mode).
        assert not torch.allclose(layer.prompt_scores, probs[0, :, -8:, :].sum(dim=(0, 1)))


@torch.no_grad()
def test_context_mode_generates_and_keeps_each_layers_budget():
    model, ids, steps = tiny_model(), prompt_ids(300), 5
    config = compression(sparsity=dict(COMPRESSING["sparsity"], scoring="context"),
                         quantization=COMPRESSING["quantization"])
    result = generate_with_cache(model, ids, config, steps)
    assert len(result.token_ids) == steps
    cache = result.cache
    for layer in cache.layers:
        budget = config.layer_budget(layer.retain_ratio, 300)
        held = sum(layer.count(tier) for tier in (TokenTier.GUARD, TokenTier.LOWBIT, TokenTier.STAGING))
        assert held == budget + steps - 1  # the prompt's budget, then one token per decode step
        assert set(range(4)) | set(range(292, 300)) <= set(layer.positions.tolist())  # sinks, recent window
    # The same config with window scoring keeps different tokens (the scores differ).
    window = generate_with_cache(model, ids, compression(**COMPRESSING), steps).cache
    assert any(
        not torch.equal(c.positions, w.positions) for c, w in zip(cache.layers, window.layers)
    )


# ---- (c) a planted token -------------------------------------------------------------------------


def planted_model(marker_token: int) -> Qwen2ForCausalLM:
    """Every query carries the same bias along one head dimension and only the marker
    token's key is non-zero along it, so all window queries attend to the marker.

    The marker is the only token with a non-zero hidden channel 0; no attention or MLP
    output writes channel 0, so it stays that way in every layer; keys read channel 0
    only. Head dim 7 pairs with dim 15 in RoPE at the lowest frequency (theta**-7/8,
    3e-4 rad per token), so the marker's logit barely depends on distance."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.0
        model.model.embed_tokens.weight[marker_token, 0] = 20.0
        for block in model.model.layers:
            attn = block.self_attn
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.zero_()
                proj.bias.zero_()
            attn.q_proj.bias.view(-1, HEAD_DIM)[:, 7] = 1.0
            attn.k_proj.weight.view(-1, HEAD_DIM, 64)[:, 7, 0] = 4.0
            attn.o_proj.weight[0] = 0.0
            block.mlp.down_proj.weight[0] = 0.0
    return model


@torch.no_grad()
def test_a_token_the_window_attends_to_is_kept_and_guarded_while_a_plain_one_is_evicted():
    marker_token, marker_at, plain_at, num_prompt = 7, 150, 100, 300
    model = planted_model(marker_token)
    ids = prompt_ids(num_prompt)
    ids[ids == marker_token] = marker_token + 1
    ids[0, marker_at] = marker_token
    config = compression(
        sparsity=dict(
            retain_ratio=0.09,  # 27 of 300: 4 sinks + 16 recent + the marker's pooled neighbourhood of 7
            budget="uniform",
            observation_window=16,
            sink_tokens=4,
            recent_window=16,
            pooling_kernel=7,
            min_prompt_len=64,
        ),
        quantization=dict(key_bits=2, value_bits=2, guard_fraction=0.25, guard_bits=16),
    )
    cache = CompressedCache(config, model)
    model(input_ids=ids, past_key_values=cache)
    neighbourhood = set(range(marker_at - 3, marker_at + 4))
    expected = set(range(4)) | neighbourhood | set(range(num_prompt - 16, num_prompt))
    for layer in cache.layers:
        kept = set(layer.positions.tolist())
        assert kept == expected
        assert marker_at in kept and plain_at not in kept
        guarded = set(layer.positions[layer.tiers == TokenTier.GUARD].tolist())
        assert guarded == neighbourhood  # the 7 highest (max-pooled) scores
        assert int(layer.prompt_scores.argmax()) in neighbourhood


# ---- (d) bytes -------------------------------------------------------------------------------------


@torch.no_grad()
def test_kv_bytes_follow_the_planners_arithmetic():
    model, num_prompt, decode_steps = tiny_model(), 200, 6
    config = compression(**COMPRESSING)
    cache = CompressedCache(config, model)
    plan = cache.plan
    model(input_ids=prompt_ids(num_prompt), past_key_values=cache)

    prompt = plan.prompt_bytes(num_prompt)
    assert [(layer.count(TokenTier.GUARD), layer.count(TokenTier.LOWBIT)) for layer in cache.layers] == (
        plan.prompt_rows(num_prompt)
    )
    assert cache.kv_bytes() == prompt["compressed"]
    assert cache.bf16_kv_bytes() == prompt["bf16"] == num_prompt * model_shape(model.config).bf16_bytes_per_token()

    for _ in range(decode_steps):
        model(input_ids=torch.tensor([[5]]), past_key_values=cache)
    layers = plan.shape.num_layers
    staged = config.quantization.decode_window  # the newest ones are still bf16
    lowbit = decode_steps - staged
    decode_bytes = (
        staged * (plan.staging_row_bytes + FREE_LIST_ENTRY_BYTES)
        + lowbit * layers * (plan.lowbit_row_bytes + FREE_LIST_ENTRY_BYTES)
        + decode_steps * (layers * LOCATION_BYTES + FREE_LIST_ENTRY_BYTES)
    )
    assert cache.kv_bytes() == prompt["compressed"] + decode_bytes
    assert cache.bf16_kv_bytes() == (num_prompt + decode_steps) * plan.shape.bf16_bytes_per_token()


def test_more_than_one_token_after_the_prompt_is_refused():
    model = tiny_model()
    cache = CompressedCache(compression(), model)
    model(input_ids=prompt_ids(20), past_key_values=cache)
    with pytest.raises(NotImplementedError, match="one token per forward"):
        model(input_ids=prompt_ids(3), past_key_values=cache)


# ---- (e) sglang-kvc demo ----------------------------------------------------------------------------


def test_demo_without_the_bundled_model_says_how_to_train_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "BUNDLED_MODEL_DIR", tmp_path / "eval" / "tiny" / "model")
    assert cli_main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "python -m eval.tiny.train" in err and "bundled model" in err


def test_demo_rejects_a_prompt_too_short_for_the_tasks(capsys):
    assert cli_main(["demo", "--prompt-tokens", "100"]) == 2
    assert "--prompt-tokens: at least" in capsys.readouterr().err


def test_demo_answers_with_both_caches_and_prints_their_bytes(capsys):
    """The bundled model on its own task formats (pass key, key-value lookup)."""
    status = cli_main(["demo", "--samples", "2", "--prompt-tokens", "512"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "config qwen_8x" in out
    rows = {label: [line for line in out.splitlines() if line.startswith(f"  {label} cache ")] for label in ("full", "compressed")}
    assert len(rows["full"]) == len(rows["compressed"]) == 2
    assert all("answer " in line for line in rows["full"] + rows["compressed"])

    def kv_bytes(line: str) -> int:
        return int(line.split(" KV ")[1].split()[0].replace(",", ""))

    assert all(kv_bytes(c) < kv_bytes(f) for c, f in zip(rows["compressed"], rows["full"]))
    # The trained model answers both seeded prompts with the full cache (measured: 2/2).
    assert "exact answers: full cache 2/2" in out
