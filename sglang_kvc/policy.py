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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sglang_kvc.config import CompressionConfig, ConfigError
from sglang_kvc.device_copy import to_device


@dataclass(frozen=True)
class PromptCandidates:
    """One prompt a prefill pass finishes, as `select_for_requests` takes it: its scoring
    queries and their positions, its candidates' positions in the prompt, and its length.
    The candidates' keys are the caller's concatenated `keys`, in prompt order."""

    window_queries: torch.Tensor  # [W, q_heads, head_dim]
    window_positions: torch.Tensor  # [W]
    positions: torch.Tensor  # [N] int64
    prompt_len: int


class TokenScorer(Protocol):
    def score(
        self,
        window_queries: torch.Tensor,  # [W, q_heads, head_dim]
        window_positions: torch.Tensor,  # [W]
        keys: torch.Tensor,  # [N, kv_heads, head_dim]
        key_positions: torch.Tensor,  # [N]
    ) -> torch.Tensor:  # [N] float32
        ...

    def score_prompts(
        self,
        prompts: list[PromptCandidates],
        keys: torch.Tensor,  # [sum of N, kv_heads, head_dim]: the prompts' candidates, concatenated
    ) -> torch.Tensor:  # [prompts, longest N] float32, -inf past each prompt's candidates
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
    # The config's observation window: the batched Triton scoring pads every prompt's queries
    # to at least this many rows, so that its row count (a constexpr) and with it the compiled
    # variant is the one start-up warmed; a prompt shorter than the window (SGLang's 3-token
    # warm-up, its 1-token health check, any short user prompt) compiled a new variant in the
    # middle of a request otherwise (~1.1 s each, serving runs 33-35).
    window: int = 0

    scoring: ClassVar[str] = "window"  # the `sparsity.scoring` value this class implements

    @classmethod
    def from_config(cls, config: CompressionConfig, implementation: str = "torch") -> "ObservationWindowScorer":
        """This class, with the config's temperature, pooling kernel and window. A config whose
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
        return cls(temperature=s.temperature, pooling_kernel=s.pooling_kernel, implementation=implementation,
                   window=s.observation_window)

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

    def score_prompts(self, prompts: list[PromptCandidates], keys: torch.Tensor) -> torch.Tensor:
        """`score` of each prompt (its own queries, its own candidates), as [prompts, longest]
        with -inf padding. With the Triton kernels all prompts are scored in the same two
        launches and pooled at once; the torch path scores them one by one."""
        if self.implementation != "triton" or len(prompts) == 1:
            return _score_one_prompt_at_a_time(self, prompts, keys)
        from sglang_kvc.kernels.score import window_scores_batched

        device = keys.device
        lengths = [prompt.positions.numel() for prompt in prompts]
        window = max(self.window, *(prompt.window_queries.shape[0] for prompt in prompts))

        def padded(rows: torch.Tensor, value=0) -> torch.Tensor:
            """A prompt shorter than the window has fewer queries: pad them at position -1
            (they see nothing). Full windows go to the stack as they are (one copy, not two)."""
            missing = window - rows.shape[0]
            return rows if missing == 0 else F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, missing), value=value)

        queries = torch.stack([padded(prompt.window_queries) for prompt in prompts])
        query_positions = torch.stack([padded(_int64_on(prompt.window_positions, device), -1) for prompt in prompts])
        key_positions = torch.cat([_int64_on(prompt.positions, device) for prompt in prompts])
        per_kv_head = window_scores_batched(queries, query_positions, keys, key_positions, lengths, self.temperature)
        # [kv_heads, N] -> [prompts, kv_heads, longest], -inf padding (max pooling then sees
        # -inf past a prompt's end, as its own padding would).
        kv_heads, longest = per_kv_head.shape[0], max(lengths)
        candidate_at = to_device(ragged_flat_index(lengths, longest), torch.int64, device)
        padded = torch.full((kv_heads, len(prompts) * longest), float("-inf"), device=device)
        padded[:, candidate_at] = per_kv_head
        padded = padded.view(kv_heads, len(prompts), longest).transpose(0, 1)
        if self.pooling_kernel > 1:
            padded = F.max_pool1d(padded, kernel_size=self.pooling_kernel, stride=1, padding=self.pooling_kernel // 2)
        # Pooling spreads the last candidates' scores into the padding: only candidates keep theirs.
        scores = torch.full((len(prompts) * longest,), float("-inf"), device=device)
        scores[candidate_at] = padded.sum(dim=1).flatten()[candidate_at]
        return scores.view(len(prompts), longest)


def _score_one_prompt_at_a_time(scorer: "ObservationWindowScorer", prompts: list[PromptCandidates],
                                keys: torch.Tensor) -> torch.Tensor:
    lengths = [prompt.positions.numel() for prompt in prompts]
    padded = torch.full((len(prompts), max(lengths)), float("-inf"), device=keys.device)
    start = 0
    for row, prompt in enumerate(prompts):
        end = start + lengths[row]
        padded[row, : lengths[row]] = scorer.score(prompt.window_queries, prompt.window_positions, keys[start:end],
                                                   prompt.positions)
        start = end
    return padded


def _int64_on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` as int64 on `device`; as it is when it already is (a no-op `.to` still costs
    a dispatch, and a pass calls this per (layer, prompt) row)."""
    if tensor.dtype == torch.int64 and tensor.device == device:
        return tensor
    return tensor.to(device=device, dtype=torch.int64)


def ragged_flat_index(counts: list[int], width: int, first_column: list[int] | None = None) -> np.ndarray:
    """Rows of `counts[r]` entries in a [rows, width] table, row r starting at column
    first_column[r] (default 0): their flat indices, row by row. Built on the host in
    numpy (O(entries), no Python loop over them) so that one pinned copy takes it to the
    device and nothing waits for the GPU."""
    counts = np.asarray(counts, dtype=np.int64)
    rows = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    columns = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    if first_column is not None:
        columns += np.repeat(np.asarray(first_column, dtype=np.int64), counts)
    return rows * width + columns


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

    def score_prompts(self, prompts: list[PromptCandidates], keys: torch.Tensor) -> torch.Tensor:
        # Per prompt: the unseen-key rule and the per-key division need each prompt's own query positions.
        return _score_one_prompt_at_a_time(self, prompts, keys)

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


def prompt_budgets(config: CompressionConfig, retain_ratios: Sequence[float],
                   prompts: Sequence[PromptCandidates]) -> tuple[list[int], list[int]]:
    """(tokens kept, of which guarded) per prompt, on the host: what `select_for_requests`
    selects for each, so a caller can size the rows it places without reading the device."""
    budgets = [config.layer_budget(ratio, prompt.positions.numel()) for ratio, prompt in zip(retain_ratios, prompts)]
    return budgets, [config.guard_count(budget) for budget in budgets]


def select_for_requests(
    config: CompressionConfig,
    scorer: TokenScorer,
    retain_ratio: float | Sequence[float],
    prompts: list[PromptCandidates],
    keys: torch.Tensor,  # [sum of N, kv_heads, head_dim]: every prompt's candidates, concatenated
) -> Selection:
    """`select_for_layer` for every prompt of a prefill pass, as one `Selection` over the
    concatenated candidates: the same tokens, in the same order, as concatenating the
    per-prompt selections. The scores are per prompt (each prompt's own queries); keeping
    and guarding run once for all prompts on [prompts, longest] tensors, so that a pass
    finishing many short prompts does not launch ~15 small kernels per prompt and layer.
    `retain_ratio`: one for all prompts, or one per prompt (the engine passes the prompts
    of several layers at once, each with its layer's ratio)."""
    ratios = [retain_ratio] * len(prompts) if isinstance(retain_ratio, (int, float)) else list(retain_ratio)
    if len(ratios) != len(prompts):
        raise ValueError(f"{len(ratios)} retain ratios for {len(prompts)} prompts")
    if len(prompts) == 1:
        (prompt,) = prompts
        return select_for_layer(config, scorer, ratios[0], prompt.window_queries, prompt.window_positions,
                                keys, prompt.positions, prompt.prompt_len)
    s = config.sparsity
    device = keys.device
    lengths = [prompt.positions.numel() for prompt in prompts]
    budgets, guard_counts = prompt_budgets(config, ratios, prompts)
    longest, most_kept, count = max(lengths), max(budgets), len(prompts)

    # [prompts, longest], padded with scores of -inf (never kept: real scores are >= 0 or
    # +inf) at position -1.
    with torch.profiler.record_function("kvc.score"):  # named in profiles and eval/host_ops.py
        padded_scores = scorer.score_prompts(prompts, keys)

    # Per prompt, from the host in one copy: where its recent window starts, its budget, where
    # its candidates start in the concatenation; the flat indices of its candidates in the
    # [prompts, longest] tables, and of its kept / guarded / low-bit ranks in the
    # [prompts, most_kept] results.
    lowbit_counts = [budget - guards for budget, guards in zip(budgets, guard_counts)]
    pieces = [np.asarray([prompt.prompt_len - s.recent_window for prompt in prompts]), np.asarray(budgets),
              np.cumsum([0, *lengths[:-1]]), ragged_flat_index(lengths, longest),
              ragged_flat_index(budgets, most_kept), ragged_flat_index(guard_counts, most_kept),
              ragged_flat_index(lowbit_counts, most_kept, first_column=guard_counts)]
    host = to_device(np.concatenate(pieces), torch.int64, device)
    recent_start, budget, first_index, candidate_at, kept_at, guarded_at, lowbit_at = torch.split(
        host, [piece.size for piece in pieces])
    recent_start, budget, first_index = recent_start[:, None], budget[:, None], first_index[:, None]
    padded_positions = torch.full((count, longest), -1, dtype=torch.int64, device=device)
    padded_positions.view(-1)[candidate_at] = torch.cat([_int64_on(prompt.positions, device) for prompt in prompts])

    forced = (padded_positions >= 0) & ((padded_positions < s.sink_tokens) | (padded_positions >= recent_start))
    priority = torch.where(forced, float("inf"), padded_scores)
    kept = torch.sort(priority, dim=1, descending=True, stable=True).indices[:, :most_kept]
    # Ranks past a prompt's budget sort last for guarding (-inf) and are left out below.
    in_budget = torch.arange(most_kept, device=device) < budget
    kept_scores = torch.where(in_budget, padded_scores.gather(1, kept), float("-inf"))
    by_score = kept.gather(1, torch.argsort(kept_scores, dim=1, descending=True, stable=True))
    kept, by_score = (kept + first_index).flatten(), (by_score + first_index).flatten()  # into the concatenation
    return Selection(kept=kept[kept_at], guarded=by_score[guarded_at], lowbit=by_score[lowbit_at],
                     scores=padded_scores.view(-1)[candidate_at])
