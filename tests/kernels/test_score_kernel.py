"""kernels/score.py (`window_scores`) against the torch scorer of policy.py, in the Triton
interpreter: fresh random data every run, outputs poisoned first, odd lengths, a window
shorter than W, a single key, GQA groups 1, 4 and 7, head_dim 64 and 96 (padded)."""

from __future__ import annotations

import pytest
import torch

from sglang_kvc.kernels.score import window_scores
from sglang_kvc.policy import ObservationWindowScorer

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


def test_rejects_mismatched_shapes(gen, device):
    q, window_positions, k, key_positions = case(gen, device, group=4, window=8, num_keys=40)
    with pytest.raises(ValueError, match="do not fit"):
        window_scores(q[:, :3], window_positions, k, key_positions)
    with pytest.raises(ValueError, match="one position"):
        window_scores(q, window_positions[:-1], k, key_positions)
