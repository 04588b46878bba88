"""Which prompt tokens a layer keeps, and which of those are guarded (torch reference).

One scorer class per policy behind one interface (as NVIDIA kvpress does with presses),
plus one selection function shared by all of them:

    scorer_from_config(config) -> the scorer `config.sparsity.scoring` names:
        "window"  ObservationWindowScorer (the prompt's last W queries, SnapKV)
        "context" ContextScorer (queries sampled across the prompt, context_queries.py)
    scorer.score(...) -> one importance value per candidate token
    select_tokens(...) -> indices kept (sinks and recent window forced in) and the
                          guarded subset (highest scores)
    select_for_layer(...) / select_for_requests(...) -> score and select one prompt / all
                          prompts a prefill pass finishes (one set of launches for all)

Selection is per layer, not per head: a physical row holds every KV head of a token,
so a token is kept or evicted for all heads of a layer at once; head scores are summed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from sglang_kvc.config import CompressionConfig, ConfigError
from sglang_kvc.device_copy import to_device


class TokenScorer(Protocol):
    def score(
        self,
        window_queries: torch.Tensor,  # [W, q_heads, head_dim]
        window_positions: torch.Tensor,  # [W]
        keys: torch.Tensor,  # [N, kv_heads, head_dim]
        key_positions: torch.Tensor,  # [N]
    ) -> torch.Tensor:  # [N] float32
        ...


@dataclass(frozen=True)
class ObservationWindowScorer:
    """SnapKV-style: attention of the prompt's last W queries to each candidate key,
    softmax per query head (at `temperature`), summed over the window and over the
    query heads of each GQA group, then max-pooled along the sequence so that the
    neighbours of an attended token survive with it.

    `implementation`: "torch" materializes the [kv_heads, group * W, N] attention;
    "triton" (`sglang_kvc.kernels.score`, what the engine uses with the Triton kernels)
    computes the same sums in two passes without it."""

    temperature: float = 1.0
    pooling_kernel: int = 7
    implementation: str = "torch"

    scoring: ClassVar[str] = "window"  # the `sparsity.scoring` value this class implements

    @classmethod
    def from_config(cls, config: CompressionConfig, implementation: str = "torch") -> "ObservationWindowScorer":
        """This class, with the config's temperature and pooling kernel. A config whose
        `sparsity.scoring` asks for another scorer is refused: `scorer_from_config` picks
        the class, and a caller that builds the window scorer by name must not score a
        context-mode config with the wrong queries."""
        s = config.sparsity
        if s.scoring != cls.scoring:
            raise ConfigError(
                f"sparsity.scoring={s.scoring!r} is not scored by {cls.__name__} "
                f"(sparsity.scoring={cls.scoring!r}); build the scorer with "
                f"sglang_kvc.policy.scorer_from_config, and feed it the queries that mode samples "
                f"(context: sglang_kvc.context_queries.StridedQuerySampler)"
            )
        return cls(temperature=s.temperature, pooling_kernel=s.pooling_kernel, implementation=implementation)

    def per_kv_head(self, window_queries, window_positions, keys, key_positions) -> torch.Tensor:
        """[kv_heads, N] fp32: summed softmax attention of each head's window queries."""
        if self.implementation == "triton":
            from sglang_kvc.kernels.score import window_scores

            return window_scores(window_queries, window_positions, keys, key_positions, self.temperature)
        num_q_heads, head_dim = window_queries.shape[1], window_queries.shape[2]
        num_kv_heads = keys.shape[1]
        group = num_q_heads // num_kv_heads
        # [kv_heads, group*W, D] x [kv_heads, D, N]: never more than W x N per head.
        q = window_queries.float().reshape(-1, num_kv_heads, group, head_dim)
        q = q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q.shape[0], head_dim)
        k = keys.float().permute(1, 2, 0)
        logits = torch.bmm(q, k) / (math.sqrt(head_dim) * self.temperature)
        causal = key_positions.view(1, 1, -1) > window_positions.repeat(group).view(1, -1, 1)
        logits.masked_fill_(causal, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        return probs.sum(dim=1)

    def score(self, window_queries, window_positions, keys, key_positions) -> torch.Tensor:
        per_kv_head = self.per_kv_head(window_queries, window_positions, keys, key_positions)
        if self.pooling_kernel > 1:
            per_kv_head = F.max_pool1d(
                per_kv_head.unsqueeze(0),
                kernel_size=self.pooling_kernel,
                stride=1,
                padding=self.pooling_kernel // 2,
            ).squeeze(0)
        return per_kv_head.sum(dim=0)


@dataclass(frozen=True)
class ContextScorer(ObservationWindowScorer):
    """Nearly question-independent scoring (`sparsity.scoring: context`): the queries are sampled
    across the whole prompt (`sglang_kvc.context_queries`: at most 2W, at a power-of-two
    stride), and each key's score is the mean attention it receives from the sampled queries
    that can see it: softmax per query head over the keys at or before the query's position
    (at `temperature`), summed over those queries and divided by how many of them there are
    (otherwise early keys win by being seen by more queries). Then, as in the window scorer,
    the query heads of a GQA group are summed, the result max-pooled along the sequence and
    summed over KV heads.

    Same code path as `ObservationWindowScorer` (which masks causally by the queries' own
    positions, so any sampled positions work), divided per key by the count of queries at or
    after it. That includes `implementation="triton"`: `kernels/score.py` masks by the
    positions it is given too, so the division applies to its sums unchanged.

    A key after the last sampled query (at most stride - 1 of a prompt's final tokens: up to
    1023 at 32K with W 16) is seen by none, so attention cannot rank it; these are where a
    question or an instruction sits at the end of a prompt, so they score +inf and are kept
    first, as the recent window is (after pooling, so that they do not lift their neighbours).
    That costs at most stride - 1 of the layer's budget."""

    scoring: ClassVar[str] = "context"

    def score(self, window_queries, window_positions, keys, key_positions) -> torch.Tensor:
        scores = super().score(window_queries, window_positions, keys, key_positions)
        if window_positions.numel() == 0:
            return scores
        last_query = window_positions.max().to(device=scores.device, dtype=torch.int64)
        unseen = key_positions.to(device=scores.device, dtype=torch.int64) > last_query
        return scores.masked_fill(unseen, float("inf"))

    def per_kv_head(self, window_queries, window_positions, keys, key_positions) -> torch.Tensor:
        """[kv_heads, N] fp32: per KV head, each key's attention summed over the query heads
        of its group, averaged over the sampled query positions that can see the key."""
        summed = super().per_kv_head(window_queries, window_positions, keys, key_positions)
        key_positions = key_positions.to(device=summed.device, dtype=torch.int64).contiguous()
        query_positions = torch.sort(window_positions.to(device=summed.device, dtype=torch.int64)).values
        seen_by = query_positions.numel() - torch.searchsorted(query_positions, key_positions, side="left")
        return summed / seen_by.clamp(min=1).to(summed.dtype)


SCORERS: dict[str, type[ObservationWindowScorer]] = {
    ObservationWindowScorer.scoring: ObservationWindowScorer,
    ContextScorer.scoring: ContextScorer,
}


def scorer_from_config(config: CompressionConfig, implementation: str = "torch") -> ObservationWindowScorer:
    """The scorer `config.sparsity.scoring` asks for ("window" or "context")."""
    return SCORERS[config.sparsity.scoring].from_config(config, implementation=implementation)


@dataclass(frozen=True)
class Selection:
    kept: torch.Tensor  # indices into the candidates: forced ones first, then by score
    guarded: torch.Tensor  # subset of `kept` stored in the guard tier
    lowbit: torch.Tensor  # the rest of `kept`
    scores: torch.Tensor  # every candidate's score (for inspection and cross-checks)


def select_tokens(
    scores: torch.Tensor,
    positions: torch.Tensor,
    *,
    budget: int,
    guard_count: int,
    sink_tokens: int,
    recent_start: int,
) -> Selection:
    """Keep `budget` candidates: every sink (position < sink_tokens) and every recent
    token (position >= recent_start) first, then the highest scores. The `guard_count`
    highest-scoring kept tokens form the guard set."""
    forced = (positions < sink_tokens) | (positions >= recent_start)
    priority = torch.where(forced, torch.full_like(scores, float("inf")), scores)
    # A stable sort rather than topk: equal scores (max pooling makes neighbours equal) are
    # then kept in position order, so `select_for_requests` reproduces this exactly.
    kept = torch.sort(priority, descending=True, stable=True).indices[: min(budget, scores.numel())]
    by_score = kept[torch.argsort(scores[kept], descending=True, stable=True)]
    return Selection(kept=kept, guarded=by_score[:guard_count], lowbit=by_score[guard_count:], scores=scores)


def select_for_layer(
    config: CompressionConfig,
    scorer: TokenScorer,
    retain_ratio: float,
    window_queries: torch.Tensor,
    window_positions: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    prompt_len: int,
) -> Selection:
    """One layer's decision at the end of a prompt: score the candidate tokens (`keys` at
    `positions`) with the scoring queries (`window_queries` at `window_positions`: the
    prompt's last W in window mode, the sampled ones in context mode), keep the layer's
    budget, guard the best.
    Shared by the SGLang path (engine.py) and the transformers reference (hf_reference.py)."""
    s = config.sparsity
    with torch.profiler.record_function("kvc.score"):  # named in profiles and eval/host_ops.py
        scores = scorer.score(window_queries, window_positions, keys, positions)
    budget = config.layer_budget(retain_ratio, keys.shape[0])
    return select_tokens(
        scores,
        positions,
        budget=budget,
        guard_count=config.guard_count(budget),
        sink_tokens=s.sink_tokens,
        recent_start=prompt_len - s.recent_window,
    )


@dataclass(frozen=True)
class PromptCandidates:
    """One prompt a prefill pass finishes, as `select_for_requests` takes it: its scoring
    queries and their positions, its candidates' positions in the prompt, and its length.
    The candidates' keys are the caller's concatenated `keys`, in prompt order."""

    window_queries: torch.Tensor  # [W, q_heads, head_dim]
    window_positions: torch.Tensor  # [W]
    positions: torch.Tensor  # [N] int64
    prompt_len: int


def select_for_requests(
    config: CompressionConfig,
    scorer: TokenScorer,
    retain_ratio: float,
    prompts: list[PromptCandidates],
    keys: torch.Tensor,  # [sum of N, kv_heads, head_dim]: every prompt's candidates, concatenated
) -> Selection:
    """`select_for_layer` for every prompt of a prefill pass, as one `Selection` over the
    concatenated candidates: the same tokens, in the same order, as concatenating the
    per-prompt selections. The scores are per prompt (each prompt's own queries); keeping
    and guarding run once for all prompts on [prompts, longest] tensors, so that a pass
    finishing many short prompts does not launch ~15 small kernels per prompt and layer."""
    if len(prompts) == 1:
        (prompt,) = prompts
        return select_for_layer(config, scorer, retain_ratio, prompt.window_queries, prompt.window_positions,
                                keys, prompt.positions, prompt.prompt_len)
    s = config.sparsity
    device = keys.device
    lengths = [prompt.positions.numel() for prompt in prompts]
    budgets = [config.layer_budget(retain_ratio, length) for length in lengths]
    guard_counts = [config.guard_count(budget) for budget in budgets]
    starts = [0, *itertools.accumulate(lengths)]
    longest, most_kept = max(lengths), max(budgets)

    # [prompts, longest], padded with scores of -inf (never kept: real scores are >= 0 or
    # +inf) at position -1.
    padded_scores = torch.full((len(prompts), longest), float("-inf"), device=device)
    padded_positions = torch.full((len(prompts), longest), -1, dtype=torch.int64, device=device)
    with torch.profiler.record_function("kvc.score"):  # named in profiles and eval/host_ops.py
        for row, (prompt, start, end) in enumerate(zip(prompts, starts, starts[1:])):
            padded_scores[row, : end - start] = scorer.score(
                prompt.window_queries, prompt.window_positions, keys[start:end], prompt.positions)
    for row, prompt in enumerate(prompts):
        padded_positions[row, : lengths[row]] = prompt.positions

    # Per prompt on the host: where its recent window starts, its budget; and the flat indices
    # that pick its kept / guarded / low-bit ranks out of the [prompts, most_kept] results.
    recent_starts = [prompt.prompt_len - s.recent_window for prompt in prompts]
    kept_at, guarded_at, lowbit_at = [], [], []
    for row, (budget, guards) in enumerate(zip(budgets, guard_counts)):
        base = row * most_kept
        kept_at.extend(range(base, base + budget))
        guarded_at.extend(range(base, base + guards))
        lowbit_at.extend(range(base + guards, base + budget))
    host = to_device([*recent_starts, *budgets, *starts[:-1], *kept_at, *guarded_at, *lowbit_at], torch.int64, device)
    count = len(prompts)
    recent_start, budget, first_index = (host[i * count : (i + 1) * count, None] for i in range(3))
    flat = host[3 * count :]
    kept_at, guarded_at, lowbit_at = torch.split(flat, [len(kept_at), len(guarded_at), len(lowbit_at)])

    forced = (padded_positions >= 0) & ((padded_positions < s.sink_tokens) | (padded_positions >= recent_start))
    priority = torch.where(forced, float("inf"), padded_scores)
    kept = torch.sort(priority, dim=1, descending=True, stable=True).indices[:, :most_kept]
    # Ranks past a prompt's budget sort last for guarding (-inf) and are left out below.
    in_budget = torch.arange(most_kept, device=device) < budget
    kept_scores = torch.where(in_budget, padded_scores.gather(1, kept), float("-inf"))
    by_score = kept.gather(1, torch.argsort(kept_scores, dim=1, descending=True, stable=True))
    kept, by_score = (kept + first_index).flatten(), (by_score + first_index).flatten()  # into the concatenation
    return Selection(kept=kept[kept_at], guarded=by_score[guarded_at], lowbit=by_score[lowbit_at],
                     scores=torch.cat([padded_scores[row, :length] for row, length in enumerate(lengths)]))
