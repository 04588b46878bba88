"""kernels/score.py (`window_scores`) against the torch scorer of policy.py, in the Triton
interpreter: fresh random data every run, outputs poisoned first, odd lengths, a window
shorter than W, a single key, GQA groups 1, 4 and 7, head_dim 64 and 96 (padded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang_kvc.kernels.score import window_scores, window_scores_batched
from sglang_kvc.policy import ObservationWindowScorer

REPO = Path(__file__).resolve().parents[2]

KV_HEADS = 2

# The interpreter turns loop bounds into Python ints through a conversion numpy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def case(gen, device, *, group, window, num_keys, head_dim=64, prefix=0):
    """Window queries at the last `window` positions of a prompt of `prefix + num_keys`
    tokens whose candidates are positions prefix..; keys with an outlier channel."""
    q = torch.randn((window, KV_HEADS * group, head_dim), generator=gen, device=device) * 2
    k = torch.randn((num_keys, KV_HEADS, head_dim), generator=gen, device=device)
    k[..., 3] *= 8
    key_positions = torch.arange(prefix, prefix + num_keys, device=device)
    window_positions = torch.arange(prefix + num_keys - window, prefix + num_keys, device=device)
    return q.to(torch.bfloat16), window_positions, k.to(torch.bfloat16), key_positions


def reference(q, window_positions, k, key_positions, temperature):
    return ObservationWindowScorer(temperature=temperature).per_kv_head(q, window_positions, k, key_positions)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("num_keys,window", [(1, 1), (37, 8), (130, 32), (200, 5)])
def test_matches_the_torch_scorer(group, num_keys, window, gen, device, monkeypatch):
    inputs = case(gen, device, group=group, window=window, num_keys=num_keys)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = window_scores(*inputs, temperature=1.0)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert not got.isnan().any(), "scores not fully written"
    torch.testing.assert_close(got, reference(*inputs, 1.0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 96])
def test_temperature_padding_and_candidates_after_a_prefix(head_dim, gen, device):
    """Candidates need not start at 0 (a prompt after a cached prefix); head_dim 96 pads."""
    inputs = case(gen, device, group=4, window=16, num_keys=77, head_dim=head_dim, prefix=300)
    got = window_scores(*inputs, temperature=2.5, block_m=16, block_n=32)
    torch.testing.assert_close(got, reference(*inputs, 2.5), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("min_keys_per_split", [16, 50])
def test_key_splits_merge_to_the_same_scores(min_keys_per_split, gen, device, monkeypatch):
    """Row statistics computed over key splits (an uneven last one; splits some window rows
    see nothing of, being later than them) and merged give the unsplit scores."""
    inputs = case(gen, device, group=7, window=32, num_keys=130, prefix=5)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = window_scores(*inputs, block_m=16, block_n=16, min_keys_per_split=min_keys_per_split)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert not got.isnan().any(), "scores not fully written"
    torch.testing.assert_close(got, reference(*inputs, 1.0), atol=1e-5, rtol=1e-4)


def test_each_window_row_contributes_one_unit_of_attention(gen, device):
    """Every row's softmax sums to 1 over the keys it sees: the scores of a head sum to its
    number of rows (group x window), whatever the data."""
    q, window_positions, k, key_positions = case(gen, device, group=7, window=9, num_keys=50)
    got = window_scores(q, window_positions, k, key_positions)
    torch.testing.assert_close(got.sum(dim=1), torch.full((KV_HEADS,), 7.0 * 9, device=device), rtol=1e-5, atol=1e-4)


def test_scorer_uses_the_kernel_when_asked(gen, device):
    inputs = case(gen, device, group=4, window=8, num_keys=40)
    torch_scorer = ObservationWindowScorer(pooling_kernel=7)
    kernel_scorer = ObservationWindowScorer(pooling_kernel=7, implementation="triton")
    torch.testing.assert_close(kernel_scorer.score(*inputs), torch_scorer.score(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("group", [1, 7])
def test_several_prompts_at_once_score_as_one_at_a_time(group, gen, device, monkeypatch):
    """Prompts of different lengths (one of a single key), candidates after different
    prefixes, a window shorter than the others (padded with position -1), key splits: each
    prompt's scores as if it were scored alone."""
    shapes = [(130, 8, 0), (1, 8, 40), (57, 3, 12), (200, 8, 5)]  # (keys, window, prefix)
    cases = [case(gen, device, group=group, window=window, num_keys=keys, prefix=prefix)
             for keys, window, prefix in shapes]
    longest_window = max(window for _, window, _ in shapes)
    q_heads, head_dim = cases[0][0].shape[1], cases[0][0].shape[2]
    queries = torch.zeros((len(cases), longest_window, q_heads, head_dim), dtype=torch.bfloat16, device=device)
    positions = torch.full((len(cases), longest_window), -1, dtype=torch.int64, device=device)
    for row, (q, window_positions, _, _) in enumerate(cases):
        queries[row, : q.shape[0]] = q
        positions[row, : q.shape[0]] = window_positions
    keys = torch.cat([k for _, _, k, _ in cases])
    key_positions = torch.cat([p for _, _, _, p in cases])
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = window_scores_batched(queries, positions, keys, key_positions, [keys for keys, _, _ in shapes],
                                block_m=16, block_n=16, min_keys_per_split=32)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert not got.isnan().any(), "scores not fully written"
    expected = torch.cat([reference(*inputs, 1.0) for inputs in cases], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_rejects_mismatched_shapes(gen, device):
    q, window_positions, k, key_positions = case(gen, device, group=4, window=8, num_keys=40)
    with pytest.raises(ValueError, match="do not fit"):
        window_scores(q[:, :3], window_positions, k, key_positions)
    with pytest.raises(ValueError, match="one position"):
        window_scores(q, window_positions[:-1], k, key_positions)
    with pytest.raises(ValueError, match="do not split"):
        window_scores_batched(q[None], window_positions[None], k, key_positions, [39])


@pytest.mark.parametrize("pooling_kernel", [1, 7])
def test_scorer_scores_a_pass_of_prompts_in_one_go(pooling_kernel, gen, device):
    """`score_prompts` with the kernels (one batched launch pair, pooling on the padded
    table) against the torch scorer prompt by prompt: same scores, -inf past each prompt."""
    from sglang_kvc.policy import PromptCandidates

    prompts, keys = [], []
    for num_keys, window, prefix in [(90, 8, 0), (33, 5, 20), (1, 8, 64)]:
        q, window_positions, k, key_positions = case(gen, device, group=4, window=window, num_keys=num_keys,
                                                     prefix=prefix)
        prompts.append(PromptCandidates(q, window_positions, key_positions, prefix + num_keys))
        keys.append(k)
    keys = torch.cat(keys)
    got = ObservationWindowScorer(pooling_kernel=pooling_kernel, implementation="triton").score_prompts(prompts, keys)
    expected = ObservationWindowScorer(pooling_kernel=pooling_kernel).score_prompts(prompts, keys)
    assert got.shape == (3, 90)
    assert torch.isinf(got[1, 33:]).all() and torch.isinf(got[2, 1:]).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_short_windows_are_padded_to_the_configs_window(gen, device, monkeypatch):
    """Prompts shorter than the observation window (a 3-token and a 1-token one, as SGLang's
    warm-up and health check send) reach the kernels with the config's window of rows, the
    row count start-up compiled for, and score as without the padding."""
    import sglang_kvc.kernels.score as score_module
    from sglang_kvc.policy import PromptCandidates

    row_counts = []
    batched = score_module.window_scores_batched

    def spy(queries, *args, **kwargs):
        row_counts.append(queries.shape[1])
        return batched(queries, *args, **kwargs)

    monkeypatch.setattr(score_module, "window_scores_batched", spy)
    prompts, keys = [], []
    for num_keys in (3, 1):
        q, window_positions, k, key_positions = case(gen, device, group=4, window=num_keys, num_keys=num_keys)
        prompts.append(PromptCandidates(q, window_positions, key_positions, num_keys))
        keys.append(k)
    keys = torch.cat(keys)
    padded = ObservationWindowScorer(implementation="triton", window=8).score_prompts(prompts, keys)
    unpadded = ObservationWindowScorer(implementation="triton").score_prompts(prompts, keys)
    assert row_counts == [8, 3]
    torch.testing.assert_close(padded, unpadded, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(padded[0, :3]).all() and torch.isfinite(padded[1, :1]).all()


def test_the_scorer_takes_the_configs_window():
    from sglang_kvc.config import load_config

    config = load_config(REPO / "configs" / "qwen_8x_tuned.yaml")
    assert ObservationWindowScorer.from_config(config).window == config.sparsity.observation_window == 8
