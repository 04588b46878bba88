"""Context (question-independent) scoring: the strided query sampler
(sglang_kvc.context_queries) and `ContextScorer` (sglang_kvc.policy)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_kvc.config import CompressionConfig, ConfigError, SparsityConfig
from sglang_kvc.context_queries import StridedQuerySampler, context_query_positions, context_query_stride
from sglang_kvc.policy import ContextScorer, ObservationWindowScorer, scorer_from_config, select_tokens

seeds = st.integers(0, 2**32 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force_positions(start: int, end: int, window: int) -> list[int]:
    """The definition, literally: the multiples of the smallest power of two that has at
    most 2W of them among start..end-1."""
    stride = 1
    while True:
        positions = [p for p in range(start, end) if p % stride == 0]
        if len(positions) <= 2 * window:
            return positions
        stride *= 2


# ---- the pure function ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(window=st.integers(1, 40), start=st.integers(0, 300), length=st.integers(0, 1500))
def test_pure_function_matches_the_definition(window, start, length):
    end = start + length
    positions = context_query_positions(start, end, window)
    assert list(positions) == brute_force_positions(start, end, window)
    stride = context_query_stride(start, end, window)
    assert stride & (stride - 1) == 0 and len(positions) <= 2 * window
    if stride > 1:  # the smallest such stride: half of it would hold too many
        assert len(range(-(-start // (stride // 2)) * (stride // 2), end, stride // 2)) > 2 * window


def test_pure_function_examples():
    assert list(context_query_positions(0, 10, 8)) == list(range(10))  # short prompt: every query
    assert list(context_query_positions(0, 1024, 32)) == list(range(0, 1024, 16))
    assert list(context_query_positions(0, 1025, 32)) == list(range(0, 1025, 32))
    assert list(context_query_positions(5, 13, 2)) == [6, 8, 10, 12]  # 4 multiples of 2 fit
    assert list(context_query_positions(5, 15, 2)) == [8, 12]  # 5 multiples of 2 do not
    assert list(context_query_positions(7, 7, 4)) == []


# ---- the chunked sampler -------------------------------------------------------------------------


def chunk_bounds(start: int, end: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({start, end, *(c for c in cuts if start < c < end)})
    return list(zip(points[:-1], points[1:]))


@settings(max_examples=300, deadline=None)
@given(
    window=st.integers(1, 24),
    start=st.integers(0, 200),
    length=st.integers(1, 1200),
    cuts=st.lists(st.integers(0, 1400), max_size=12),
    empty_chunks=st.booleans(),
    as_tensor=st.booleans(),
)
def test_chunked_sampler_ends_where_the_pure_function_says(window, start, length, cuts, empty_chunks, as_tensor):
    """Any chunking of the same prompt: the same positions, and the held queries are the
    queries at those positions (each query here carries its own position as its value)."""
    end = start + length
    sampler = StridedQuerySampler(window)
    for lo, hi in chunk_bounds(start, end, cuts):
        queries = torch.arange(lo, hi, dtype=torch.float64).view(-1, 1, 1).expand(-1, 3, 2).clone()
        positions = torch.arange(lo, hi) if as_tensor else range(lo, hi)
        sampler.add(queries, positions)
        if empty_chunks:
            sampler.add(queries[:0], range(hi, hi))
        # After every chunk: what the pure function gives for the prompt so far.
        assert sampler.positions().tolist() == list(context_query_positions(start, hi, window))
    expected = list(context_query_positions(start, end, window))
    assert sampler.stride == context_query_stride(start, end, window)
    assert sampler.positions().tolist() == expected
    held = sampler.queries()
    assert held.shape == (len(expected), 3, 2)
    assert held[:, 0, 0].tolist() == [float(p) for p in expected]
    assert (held == held[:, :1, :1]).all()


def test_sampler_keeps_copies_not_views_of_the_chunk():
    sampler = StridedQuerySampler(4)
    chunk = torch.arange(20, dtype=torch.float32).view(20, 1)
    sampler.add(chunk, range(20))
    chunk.zero_()
    assert sampler.queries().flatten().tolist() == [0.0, 4.0, 8.0, 12.0, 16.0]


@pytest.mark.parametrize(
    "first, second, message",
    [
        (range(0, 4), range(5, 9), "continue at 4"),  # a gap
        (range(0, 4), range(3, 7), "continue at 4"),  # an overlap
        (range(0, 4), [4, 6, 5, 7], "consecutive"),
        (range(0, 4), range(4, 7), "4 queries but 3 positions"),
    ],
)
def test_sampler_refuses_positions_that_do_not_continue_the_prompt(first, second, message):
    sampler = StridedQuerySampler(2)
    sampler.add(torch.zeros(len(first), 1), first)
    with pytest.raises(ValueError, match=message):
        sampler.add(torch.zeros(4, 1), second)


# ---- prefix safety: what is and what is not true ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(window=st.integers(1, 40), prefix=st.integers(1, 2000), suffix=st.integers(0, 2000))
def test_a_suffix_never_adds_a_sampled_position_before_the_prefix_end(window, prefix, suffix):
    """Appending L tokens after a prefix of P tokens can only drop sampled positions before
    P, never add one: those left are the prefix's own positions that lie on the longer
    prompt's (possibly doubled) stride. None is dropped while the longer prompt keeps the
    prefix's stride, i.e. while P + L <= 2W * stride(P). The positions depend on lengths
    only, never on the tokens."""
    alone = set(context_query_positions(0, prefix, window))
    with_suffix = {p for p in context_query_positions(0, prefix + suffix, window) if p < prefix}
    longer_stride = context_query_stride(0, prefix + suffix, window)
    assert with_suffix == {p for p in alone if p % longer_stride == 0}
    if prefix + suffix <= 2 * window * context_query_stride(0, prefix, window):
        assert longer_stride == context_query_stride(0, prefix, window) and with_suffix == alone


def test_a_suffix_shorter_than_the_stride_can_still_drop_positions():
    """W = 1: a 4-token prefix is sampled at stride 2 ({0, 2}); one more token (shorter than
    the stride) makes 3 multiples of 2, so the stride doubles and position 2 is dropped.
    Context scoring is prefix-safe only approximately."""
    assert list(context_query_positions(0, 4, 1)) == [0, 2]
    assert list(context_query_positions(0, 5, 1)) == [0, 4]


# ---- the scorer ----------------------------------------------------------------------------------


def reference_context_scores(queries, query_positions, keys, key_positions, temperature, pooling_kernel):
    """Written out query head by query head and query by query, in float64: each key's
    softmax share summed over the sampled queries that see it (and over the query heads of
    its GQA group), divided by the number of sampled queries that see it; then max-pooled
    per KV head and summed over KV heads."""
    num_queries, q_heads, head_dim = queries.shape
    num_keys, kv_heads, _ = keys.shape
    group = q_heads // kv_heads
    per_kv_head = torch.zeros((kv_heads, num_keys), dtype=torch.float64)
    for head in range(q_heads):
        kv = head // group
        for w in range(num_queries):
            visible = key_positions <= query_positions[w]
            if not visible.any():
                continue
            logits = keys[:, kv].double() @ queries[w, head].double() / (math.sqrt(head_dim) * temperature)
            per_kv_head[kv] += torch.softmax(logits.masked_fill(~visible, -math.inf), dim=0)
    for n in range(num_keys):
        seen_by = sum(int(query_positions[w]) >= int(key_positions[n]) for w in range(num_queries))
        if seen_by:
            per_kv_head[:, n] /= seen_by
    radius = pooling_kernel // 2
    pooled = torch.stack(
        [per_kv_head[:, max(0, i - radius) : i + radius + 1].amax(dim=1) for i in range(num_keys)], dim=1
    )
    scores = pooled.sum(dim=0)
    for n in range(num_keys):  # after every sampled query: ranked first
        if num_queries and int(key_positions[n]) > int(query_positions.max()):
            scores[n] = math.inf
    return scores


def sampled_prompt(gen, start, num_keys, window, q_heads, kv_heads, head_dim):
    """Keys at start..start+N-1 and queries at the context-mode positions of that prompt."""
    key_positions = start + torch.arange(num_keys)
    query_positions = torch.tensor(list(context_query_positions(start, start + num_keys, window)), dtype=torch.int64)
    keys = torch.randn((num_keys, kv_heads, head_dim), generator=gen)
    queries = 2.0 * torch.randn((query_positions.numel(), q_heads, head_dim), generator=gen)
    return queries, query_positions, keys, key_positions


@settings(max_examples=60, deadline=None)
@given(
    group=st.sampled_from([1, 7]),
    kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([8, 32]),
    window=st.integers(1, 10),
    num_keys=st.integers(1, 60).map(lambda n: 2 * n + 1),  # odd lengths
    start=st.integers(0, 50),
    temperature=st.floats(0.25, 4.0),
    pooling_kernel=st.sampled_from([1, 3, 7]),
    shuffle=st.booleans(),
    seed=seeds,
)
def test_context_scores_match_reference(
    group, kv_heads, head_dim, window, num_keys, start, temperature, pooling_kernel, shuffle, seed
):
    gen = generator(seed)
    queries, query_positions, keys, key_positions = sampled_prompt(
        gen, start, num_keys, window, group * kv_heads, kv_heads, head_dim
    )
    if shuffle:  # the scorer must not rely on the queries' order
        order = torch.randperm(query_positions.numel(), generator=gen)
        queries, query_positions = queries[order], query_positions[order]
    scorer = ContextScorer(temperature=temperature, pooling_kernel=pooling_kernel)
    scores = scorer.score(queries, query_positions, keys, key_positions)
    assert scores.shape == (num_keys,) and scores.dtype == torch.float32
    expected = reference_context_scores(queries, query_positions, keys, key_positions, temperature, pooling_kernel)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", [1, 7])
def test_a_key_every_viewer_attends_to_beats_one_seen_by_more_queries(group):
    """Key A (position 10) takes all attention of the queries before key B (position 250);
    B, a stronger match, takes all attention of the queries after it. The window scorer's
    sum over these queries ranks A first because more queries see it; the per-key mean of
    the context scorer gives B (attended by every query that sees it) ~1 per query head."""
    gen = generator(7 + group)
    kv_heads, head_dim, num_keys, window, a, b = 2, 32, 281, 16, 10, 250
    q_heads = group * kv_heads
    prompt = sampled_prompt(gen, 0, num_keys, window, q_heads, kv_heads, head_dim)
    queries, query_positions, keys, key_positions = prompt
    direction = torch.nn.functional.normalize(torch.randn(head_dim, generator=gen), dim=0)
    keys.mul_(0.1)
    queries = 0.1 * queries + 8.0 * direction
    keys[a] = 8.0 * direction
    keys[b] = 12.0 * direction
    seen_a = int((query_positions >= a).sum())
    seen_b = int((query_positions >= b).sum())
    assert seen_a > 3 * seen_b  # the setting: A is seen by many more sampled queries

    summed = ObservationWindowScorer(pooling_kernel=1).score(queries, query_positions, keys, key_positions)
    mean = ContextScorer(pooling_kernel=1).score(queries, query_positions, keys, key_positions)
    assert summed[a] > summed[b]
    assert mean[b] > mean[a]
    assert mean[b].item() == pytest.approx(q_heads, rel=0.02)
    assert mean[a].item() == pytest.approx(q_heads * (seen_a - seen_b) / seen_a, rel=0.02)


@settings(max_examples=40, deadline=None)
@given(
    group=st.sampled_from([1, 7]),
    window=st.integers(2, 12),
    prefix=st.integers(20, 150),
    suffix=st.integers(1, 60),
    planted=st.booleans(),
    seed=seeds,
)
def test_a_question_moves_prefix_scores_at_most_by_its_share_of_the_queries(
    group, window, prefix, suffix, planted, seed
):
    """Two prompts with the same first P tokens (keys and queries) and different questions
    after them: the sampled positions are the same (same length), every query before P
    attends identically (causal), so a prefix key's context score can differ only through
    the sampled question queries: by at most q_heads * (question queries) / (queries that
    see the key). With `planted`, prompt B's question attends to prefix key 3 alone and
    prompt A's looks away from it, which comes close to the bound (it is not vacuous)."""
    gen = generator(seed)
    kv_heads, head_dim = 2, 16
    q_heads, num_keys = group * kv_heads, prefix + suffix
    prompt = sampled_prompt(gen, 0, num_keys, window, q_heads, kv_heads, head_dim)
    queries, query_positions, keys, key_positions = prompt
    in_question = query_positions >= prefix
    other_queries, other_keys = queries.clone(), keys.clone()
    other_queries[in_question] = 2.0 * torch.randn(other_queries[in_question].shape, generator=gen)
    other_keys[prefix:] = torch.randn(other_keys[prefix:].shape, generator=gen)
    if planted:
        direction = torch.nn.functional.normalize(torch.randn(head_dim, generator=gen), dim=0)
        keys[3] = other_keys[3] = 12.0 * direction  # a prefix key: the same in both prompts
        other_queries[in_question] = 12.0 * direction
        queries[in_question] = -12.0 * direction
    assert torch.equal(keys[:prefix], other_keys[:prefix])
    assert torch.equal(queries[~in_question], other_queries[~in_question])
    scorer = ContextScorer(pooling_kernel=1)
    a = scorer.score(queries, query_positions, keys, key_positions)[:prefix]
    b = scorer.score(other_queries, query_positions, other_keys, key_positions)[:prefix]
    seen_by = (query_positions.view(1, -1) >= key_positions[:prefix].view(-1, 1)).sum(dim=1)
    # Prefix keys after the last sampled query (no question query was sampled) rank first in both.
    assert torch.isinf(a[seen_by == 0]).all() and torch.isinf(b[seen_by == 0]).all()
    a, b, seen_by = a[seen_by > 0], b[seen_by > 0], seen_by[seen_by > 0]
    bound = q_heads * int(in_question.sum()) / seen_by
    assert ((a - b).abs() <= bound + 1e-4).all()
    if int(in_question.sum()) == 0:
        assert torch.equal(a, b)
    if planted and int(in_question.sum()) > 0:
        assert (b[3] - a[3]).item() > 0.5 * bound[3].item()


@settings(max_examples=40, deadline=None)
@given(window=st.integers(1, 6), num_keys=st.integers(40, 400), seed=seeds)
def test_keys_after_the_last_sampled_query_are_kept_first(window, num_keys, seed):
    """The prompt's final tokens after the last sampled query (fewer than the stride, where a
    question usually sits) are seen by no scoring query; they rank first, so a layer keeps
    them all even on a budget that the recent window alone would not cover."""
    gen = generator(seed)
    queries, query_positions, keys, key_positions = sampled_prompt(gen, 0, num_keys, window, 4, 2, 16)
    unseen = key_positions > query_positions.max()
    scores = ContextScorer(pooling_kernel=7).score(queries, query_positions, keys, key_positions)
    assert torch.isinf(scores[unseen]).all() and torch.isfinite(scores[~unseen]).all()
    assert int(unseen.sum()) < context_query_stride(0, num_keys, window)
    selection = select_tokens(scores, key_positions, budget=int(unseen.sum()) + 2, guard_count=0,
                              sink_tokens=1, recent_start=num_keys - 1)
    kept = set(selection.kept.tolist())
    assert set(unseen.nonzero().squeeze(1).tolist()) <= kept and 0 in kept  # and the sink


def test_scorer_from_config_picks_by_scoring_and_from_config_refuses_the_other_mode():
    window = CompressionConfig(sparsity=SparsityConfig(temperature=2.0, pooling_kernel=3))
    context = CompressionConfig(sparsity=SparsityConfig(temperature=2.0, pooling_kernel=3, scoring="context"))
    assert type(scorer_from_config(window)) is ObservationWindowScorer
    built = scorer_from_config(context)
    assert type(built) is ContextScorer and (built.temperature, built.pooling_kernel) == (2.0, 3)
    assert scorer_from_config(context, implementation="triton").implementation == "triton"
    # A caller that builds the window scorer by name (the SGLang engine) must not silently
    # score a context-mode config with its last-W queries.
    with pytest.raises(ConfigError, match="sparsity.scoring='context'.*scorer_from_config"):
        ObservationWindowScorer.from_config(context)
    with pytest.raises(ConfigError, match="sparsity.scoring='window'"):
        ContextScorer.from_config(window)


def _triton_unavailable() -> str | None:
    try:
        from sglang_kvc.kernels.score import window_scores

        q = torch.randn(2, 2, 16)
        window_scores(q, torch.tensor([3, 5]), torch.randn(6, 1, 16), torch.arange(6))
    except Exception as exc:  # noqa: BLE001 - any failure: the kernel cannot run here
        return f"the Triton score kernel cannot run here: {exc!r}"
    return None


@pytest.mark.parametrize("group", [1, 7])
def test_triton_implementation_matches_torch(group):
    """ContextScorer(implementation="triton") divides the Triton kernel's sums (interpreted
    on the CPU here, TRITON_INTERPRET=1 from tests/conftest.py) by the same counts."""
    reason = _triton_unavailable()
    if reason:
        pytest.skip(reason)
    gen = generator(40 + group)
    prompt = sampled_prompt(gen, 3, 97, 8, 2 * group, 2, 16)
    torch_scores = ContextScorer(pooling_kernel=5).score(*prompt)
    triton_scores = ContextScorer(pooling_kernel=5, implementation="triton").score(*prompt)
    torch.testing.assert_close(triton_scores, torch_scores, atol=1e-4, rtol=1e-3)


class RecordingScorer:
    """Wraps a scorer and keeps the (queries, positions) the engine scores each layer with."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(self, window_queries, window_positions, keys, key_positions):
        self.calls.append((window_queries.clone(), window_positions.clone()))
        return self.inner.score(window_queries, window_positions, keys, key_positions)

    def score_prompts(self, prompts, keys):
        """The engine scores a pass's prompts of every layer together: record each one."""
        scores = torch.full((len(prompts), max(p.positions.numel() for p in prompts)), float("-inf"))
        start = 0
        for row, prompt in enumerate(prompts):
            count = prompt.positions.numel()
            scores[row, :count] = self.score(prompt.window_queries, prompt.window_positions,
                                             keys[start : start + count], prompt.positions)
            start += count
        return scores


@pytest.mark.parametrize("scoring", ["window", "context"])
def test_the_sglang_engine_scores_a_chunked_prompt_with_the_modes_queries(scoring):
    """Through real SGLang objects (tests/sim.py): a prompt prefilled in chunks, after a
    radix-cached prefix, is scored at its last chunk with exactly the queries its mode asks
    for: the last W (window) or those at `context_query_positions` over the uncached part
    (context), taken from every chunk, rotated like the keys."""
    from sim import SMALL_CONFIG, Simulator

    from sglang_kvc.config import config_from_dict
    from sglang_kvc.engine import CompressedAttention

    config = config_from_dict({**SMALL_CONFIG, "sparsity": {**SMALL_CONFIG["sparsity"], "scoring": scoring}})
    sim = Simulator(num_layers=2, config=config)
    raw_queries: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    class RecordingAttention(CompressedAttention):
        def extend(self, layer_id, q, scaling, logit_cap=0.0, new_kv=None):
            raw_queries[layer_id].append(q.clone())
            return super().extend(layer_id, q, scaling, logit_cap, new_kv)

    scorer = RecordingScorer(scorer_from_config(config))
    sim.engine = RecordingAttention(sim.pool, sim.req_to_token_pool.req_to_token, scorer=scorer, attention_impl="torch")
    first = sim.new_request(list(range(100, 140)), 1)
    assert sim.admit(first)
    sim.prefill_chunk(first)
    scorer.calls.clear()
    raw_queries[0].clear()
    raw_queries[1].clear()
    cached = 32
    chunked = sim.new_request(list(range(100, 100 + cached)) + list(range(500, 590)), 1, chunk_size=23)
    assert sim.admit(chunked) and len(chunked.req.prefix_indices) == cached
    while not chunked.prompt_done:
        sim.prefill_chunk(chunked)
    prompt_len = cached + 90
    window = config.sparsity.observation_window
    expected = (
        list(range(prompt_len - window, prompt_len))
        if scoring == "window"
        else list(context_query_positions(cached, prompt_len, window))
    )
    assert len(scorer.calls) == 2  # one per layer, at the last chunk
    for layer, (queries, positions) in enumerate(scorer.calls):
        assert positions.tolist() == expected
        every_query = sim.pool.rotate(torch.cat(raw_queries[layer]))  # positions cached..prompt_len-1
        torch.testing.assert_close(queries, every_query[positions - cached], rtol=0, atol=0)


def test_the_ablations_scoring_group_compares_window_and_context_at_the_base_ratio():
    import dataclasses
    from pathlib import Path

    from eval.ablate import build_variants
    from sglang_kvc.config import load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "qwen_8x_tuned.yaml")
    variants = {name: config for name, (group, config) in build_variants(base, ["scoring"]).items()}
    window, context = variants["scoring window (base)"], variants["scoring context"]
    assert (window.sparsity.scoring, context.sparsity.scoring) == ("window", "context")
    assert window.sparsity == base.sparsity and window.quantization == base.quantization
    assert dataclasses.replace(context.sparsity, scoring="window") == base.sparsity
    assert context.quantization == base.quantization
