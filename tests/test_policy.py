"""Token selection: the observation-window scorer and `select_tokens` (sglang_kvc.policy)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_kvc.config import CompressionConfig, QuantizationConfig, SparsityConfig
from sglang_kvc.policy import ObservationWindowScorer, select_tokens

GQA_GROUPS = (1, 4, 7)  # 7 = Qwen2.5-7B (28 query heads over 4 KV heads)
seeds = st.integers(0, 2**32 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_scores(queries, query_positions, keys, key_positions, temperature, pooling_kernel):
    """The scorer written out head by head and query by query, in float64. Query head h
    reads KV head h // group (the Hugging Face / SGLang GQA layout)."""
    window, q_heads, head_dim = queries.shape
    num_keys, kv_heads, _ = keys.shape
    group = q_heads // kv_heads
    per_kv_head = torch.zeros((kv_heads, num_keys), dtype=torch.float64)
    for head in range(q_heads):
        kv = head // group
        for w in range(window):
            visible = key_positions <= query_positions[w]
            if not visible.any():
                continue
            logits = keys[:, kv].double() @ queries[w, head].double() / (math.sqrt(head_dim) * temperature)
            per_kv_head[kv] += torch.softmax(logits.masked_fill(~visible, -math.inf), dim=0)
    radius = pooling_kernel // 2
    pooled = torch.stack(
        [per_kv_head[:, max(0, i - radius) : i + radius + 1].amax(dim=1) for i in range(num_keys)], dim=1
    )
    return pooled.sum(dim=0)


def random_prompt(gen, num_keys, window, q_heads, kv_heads, head_dim, first_position=0):
    keys = torch.randn((num_keys, kv_heads, head_dim), generator=gen)
    queries = torch.randn((window, q_heads, head_dim), generator=gen)
    key_positions = first_position + torch.arange(num_keys)
    query_positions = key_positions[-window:]  # the prompt's last `window` tokens
    return queries, query_positions, keys, key_positions


# ---- scorer ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    group=st.sampled_from(GQA_GROUPS),
    kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([8, 32, 64]),
    window=st.integers(1, 12),
    extra_keys=st.integers(0, 80),
    first_position=st.integers(0, 1000),
    temperature=st.floats(0.25, 4.0),
    pooling_kernel=st.sampled_from([1, 3, 7]),
    seed=seeds,
)
def test_scores_match_reference(
    group, kv_heads, head_dim, window, extra_keys, first_position, temperature, pooling_kernel, seed
):
    q_heads = group * kv_heads
    prompt = random_prompt(generator(seed), window + extra_keys, window, q_heads, kv_heads, head_dim, first_position)
    prompt[0].mul_(2.0)  # sharper attention than unit-variance noise gives
    scorer = ObservationWindowScorer(temperature=temperature, pooling_kernel=pooling_kernel)
    scores = scorer.score(*prompt)
    assert scores.shape == (window + extra_keys,) and scores.dtype == torch.float32
    expected = reference_scores(*prompt, temperature, pooling_kernel)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", GQA_GROUPS)
def test_scorer_is_causal(group):
    """Keys after every window query get exactly zero before pooling, however strongly
    they match the queries, and each query's attention (summing to 1) goes to the rest."""
    gen = generator(100 + group)
    kv_heads, head_dim, window, num_past, num_future = 2, 32, 8, 60, 5
    q_heads = group * kv_heads
    queries, query_positions, keys, key_positions = random_prompt(
        gen, num_past, window, q_heads, kv_heads, head_dim, first_position=17
    )
    direction = torch.nn.functional.normalize(torch.randn(head_dim, generator=gen), dim=0)
    queries = queries + 8.0 * direction
    future_keys = 8.0 * direction.expand(num_future, kv_heads, head_dim)
    all_keys = torch.cat((keys, future_keys))
    all_positions = torch.cat((key_positions, key_positions[-1] + 1 + torch.arange(num_future)))

    scores = ObservationWindowScorer(pooling_kernel=1).score(queries, query_positions, all_keys, all_positions)
    assert torch.equal(scores[num_past:], torch.zeros(num_future))
    assert (scores[:num_past] > 0).all()
    assert scores.sum().item() == pytest.approx(window * q_heads, rel=1e-5)


def test_query_head_reads_its_own_kv_head():
    """A key that matches the queries of KV head 1's group, planted only in KV head 1,
    wins; the same vector planted in KV head 0 (which those queries do not read) does not."""
    gen = generator(5)
    group, kv_heads, head_dim, window, num_keys = 7, 4, 64, 8, 80
    queries, query_positions, keys, key_positions = random_prompt(
        gen, num_keys, window, group * kv_heads, kv_heads, head_dim
    )
    direction = torch.nn.functional.normalize(torch.randn(head_dim, generator=gen), dim=0)
    queries[:, group : 2 * group] += 12.0 * direction  # query heads 7..13 read KV head 1
    keys[20, 1] = 12.0 * direction
    keys[50, 0] = 12.0 * direction
    scores = ObservationWindowScorer(pooling_kernel=1).score(queries, query_positions, keys, key_positions)
    assert scores.argmax().item() == 20
    assert scores[20] > 0.9 * window * group  # almost all of that group's attention
    assert scores[50] < scores[20] / 10


# ---- the full selection path -------------------------------------------------------------------


def planted_prompt(group, seed, num_keys=512, window=32, kv_heads=2, head_dim=64, planted=200):
    """Random keys and window queries, plus one key aligned with every window query."""
    gen = generator(seed)
    queries, query_positions, keys, key_positions = random_prompt(
        gen, num_keys, window, group * kv_heads, kv_heads, head_dim
    )
    direction = torch.nn.functional.normalize(torch.randn(head_dim, generator=gen), dim=0)
    queries += 10.0 * direction
    keys[planted] = 10.0 * direction
    return queries, query_positions, keys, key_positions


@pytest.mark.parametrize("group", GQA_GROUPS)
@pytest.mark.parametrize("pooling_kernel", [1, 7])
def test_planted_token_is_kept_and_guarded(group, pooling_kernel):
    planted, num_keys = 200, 512
    config = CompressionConfig(
        sparsity=SparsityConfig(retain_ratio=0.15, budget="uniform", pooling_kernel=pooling_kernel),
        quantization=QuantizationConfig(guard_fraction=0.1),
    )
    s = config.sparsity
    prompt = planted_prompt(group, seed=group * 31 + pooling_kernel, num_keys=num_keys, planted=planted)
    scores = ObservationWindowScorer.from_config(config).score(*prompt)
    budget = config.layer_budget(s.retain_ratio, num_keys)
    guard_count = config.guard_count(budget)
    assert (budget, guard_count) == (77, 8)
    selection = select_tokens(
        scores,
        prompt[3],
        budget=budget,
        guard_count=guard_count,
        sink_tokens=s.sink_tokens,
        recent_start=num_keys - s.recent_window,
    )
    kept, guarded = set(selection.kept.tolist()), set(selection.guarded.tolist())
    assert planted in kept and planted in guarded
    # Max-pooling gives the planted token's neighbours its score: they survive (and, being
    # the next best, are guarded) with it.
    radius = pooling_kernel // 2
    neighbourhood = set(range(planted - radius, planted + radius + 1))
    assert neighbourhood <= guarded
    if pooling_kernel == 1:
        assert scores.argmax().item() == planted


# ---- select_tokens -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    num_candidates=st.integers(1, 400),
    first_position=st.integers(0, 8),
    sink_tokens=st.integers(0, 8),
    recent_window=st.integers(0, 64),
    budget_fraction=st.floats(0.0, 1.0),
    guard_fraction=st.floats(0.0, 1.0),
    seed=seeds,
)
def test_select_tokens_properties(
    num_candidates, first_position, sink_tokens, recent_window, budget_fraction, guard_fraction, seed
):
    gen = generator(seed)
    positions = first_position + torch.arange(num_candidates)
    # Distinct random scores: the expected top set is unambiguous.
    scores = torch.randperm(num_candidates, generator=gen).float() + torch.rand(num_candidates, generator=gen) * 0.5
    recent_start = int(positions[-1]) + 1 - recent_window
    forced = (positions < sink_tokens) | (positions >= recent_start)
    num_forced = int(forced.sum())
    budget = num_forced + round(budget_fraction * (num_candidates - num_forced))
    guard_count = round(guard_fraction * budget)

    selection = select_tokens(
        scores, positions, budget=budget, guard_count=guard_count, sink_tokens=sink_tokens, recent_start=recent_start
    )
    kept = selection.kept.tolist()
    assert len(kept) == budget == len(set(kept))
    assert set(torch.nonzero(forced).flatten().tolist()) <= set(kept)  # sinks and recent window
    # The remaining budget goes to the highest-scoring other candidates.
    free = ~forced
    kept_mask = torch.zeros(num_candidates, dtype=torch.bool)
    kept_mask[selection.kept] = True
    chosen, dropped = scores[free & kept_mask], scores[free & ~kept_mask]
    if len(chosen) and len(dropped):
        assert chosen.min() > dropped.max()
    # Guard: the guard_count best scores among the kept, the rest low-bit; a partition.
    guarded, lowbit = selection.guarded.tolist(), selection.lowbit.tolist()
    assert len(guarded) == guard_count
    assert sorted(guarded + lowbit) == sorted(kept)
    if guarded and lowbit:
        assert scores[selection.guarded].min() > scores[selection.lowbit].max()


def test_select_tokens_budget_above_candidates_keeps_all():
    scores = torch.rand(20, generator=generator(3)) + 0.1
    selection = select_tokens(scores, torch.arange(20), budget=50, guard_count=5, sink_tokens=2, recent_start=16)
    assert sorted(selection.kept.tolist()) == list(range(20))
    assert sorted(selection.guarded.tolist()) == torch.topk(scores, 5).indices.sort().values.tolist()


def test_forced_tokens_win_over_higher_scores():
    """Sinks and recent tokens are kept even when every other candidate scores higher."""
    num_candidates, sinks, recent = 100, 4, 8
    scores = torch.rand(num_candidates, generator=generator(11)) + 1.0
    scores[:sinks] = 1e-6
    scores[-recent:] = 1e-6
    selection = select_tokens(
        scores, torch.arange(num_candidates), budget=20, guard_count=0, sink_tokens=sinks,
        recent_start=num_candidates - recent,
    )
    kept = set(selection.kept.tolist())
    assert set(range(sinks)) <= kept and set(range(num_candidates - recent, num_candidates)) <= kept
    free_kept = kept - set(range(sinks)) - set(range(num_candidates - recent, num_candidates))
    assert free_kept == set(torch.topk(scores[sinks:-recent], 8).indices.add(sinks).tolist())


# ---- select_for_requests: every prompt of a prefill pass at once -----------------------------


def _prompts_of_a_pass(gen, lengths, staged_from, window, q_heads, kv_heads, head_dim, quantized_keys):
    """Per prompt: scoring queries at its last positions and candidates = its staged tail
    (a radix-matched prefix is not a candidate). `quantized_keys` rounds the keys to a few
    values so that scores tie, as max pooling makes neighbours tie."""
    from sglang_kvc.policy import PromptCandidates

    prompts, keys = [], []
    for length, first_staged in zip(lengths, staged_from):
        queries = torch.randn(min(window, length), q_heads, head_dim, generator=gen)
        query_positions = torch.arange(length - queries.shape[0], length)
        candidate_positions = torch.arange(first_staged, length)
        prompt_keys = torch.randn(candidate_positions.numel(), kv_heads, head_dim, generator=gen)
        if quantized_keys:
            prompt_keys = prompt_keys.round()
        prompts.append(PromptCandidates(queries, query_positions, candidate_positions, length))
        keys.append(prompt_keys)
    return prompts, torch.cat(keys)


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 40)), min_size=1, max_size=6),
    scoring=st.sampled_from(["window", "context"]),
    retain_ratio=st.floats(0.05, 1.0),
    guard_fraction=st.sampled_from([0.0, 0.1, 0.5]),
    pooling_kernel=st.sampled_from([1, 3, 7]),
    quantized_keys=st.booleans(),
    ratio_per_prompt=st.booleans(),
    seed=seeds,
)
def test_select_for_requests_equals_one_prompt_at_a_time(prompts, scoring, retain_ratio, guard_fraction,
                                                         pooling_kernel, quantized_keys, ratio_per_prompt, seed):
    """The batched selection is the concatenation of `select_for_layer` per prompt, index for
    index (ties included: both break them by position), for either scorer; with one retain
    ratio for all prompts or one each (the engine's prompts of several layers), and
    `prompt_budgets` says how many each keeps and guards."""
    from sglang_kvc.policy import prompt_budgets, scorer_from_config, select_for_layer, select_for_requests

    config = CompressionConfig(
        sparsity=SparsityConfig(retain_ratio=retain_ratio, budget="uniform", pooling_kernel=pooling_kernel,
                                scoring=scoring, min_prompt_len=16, sink_tokens=4, recent_window=8,
                                observation_window=8),
        quantization=QuantizationConfig(guard_fraction=guard_fraction),
    )
    scorer = scorer_from_config(config)
    lengths = [length for length, _ in prompts]
    staged_from = [min(prefix, length - 1) for length, prefix in prompts]
    batch, keys = _prompts_of_a_pass(generator(seed), lengths, staged_from, window=8, q_heads=4, kv_heads=2,
                                     head_dim=16, quantized_keys=quantized_keys)
    ratios = [retain_ratio * (1 - 0.4 * (i % 3) / 2) for i in range(len(batch))] if ratio_per_prompt else None
    together = select_for_requests(config, scorer, ratios or retain_ratio, batch, keys)

    expected = {"kept": [], "guarded": [], "lowbit": [], "scores": []}
    offset = 0
    budgets, guards = prompt_budgets(config, ratios or [retain_ratio] * len(batch), batch)
    for row, prompt in enumerate(batch):
        count = prompt.positions.numel()
        alone = select_for_layer(config, scorer, ratios[row] if ratios else retain_ratio, prompt.window_queries,
                                 prompt.window_positions, keys[offset : offset + count], prompt.positions,
                                 prompt.prompt_len)
        assert (alone.kept.numel(), alone.guarded.numel()) == (budgets[row], guards[row])
        for field in ("kept", "guarded", "lowbit"):
            expected[field].append(getattr(alone, field) + offset)
        expected["scores"].append(alone.scores)
        offset += count
    for field in ("kept", "guarded", "lowbit"):
        assert getattr(together, field).tolist() == torch.cat(expected[field]).tolist(), field
    torch.testing.assert_close(together.scores, torch.cat(expected["scores"]))
    with pytest.raises(ValueError, match="retain ratios"):
        select_for_requests(config, scorer, [retain_ratio] * (len(batch) + 1), batch, keys)
