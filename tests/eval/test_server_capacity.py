"""eval/server_capacity.py's comparison with the stock run (the GPU script itself needs a server)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def capacity():
    spec = importlib.util.spec_from_file_location("server_capacity", REPO / "eval" / "server_capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def sample(ids, logprobs):
    return {"output_ids": ids, "output_logprobs": logprobs, "cached_tokens": 0}


def test_compare_with_stock_counts_matching_prefixes_and_their_logprob_differences(capacity):
    stock = [sample([1, 2, 3, 4], [-0.5, -1.0, -2.0, -0.1]), sample([7, 8], [-1.0, -1.0])]
    ours = [sample([1, 2, 9, 4], [-0.4, -1.25, -3.0, -0.1]), sample([7, 8], [-1.0, -0.5])]
    result = capacity.compare_with_stock(ours, stock)
    # Sample 0 diverges at token 2 (so its token 3 is not comparable); sample 1 matches fully.
    assert result["first_difference_at"] == [2, None]
    assert result["identical_samples"] == 1
    assert result["matching_prefix_fraction"] == pytest.approx(4 / 6, abs=1e-4)
    assert result["tokens_compared"] == 4
    assert result["logprob_abs_diff_mean"] == pytest.approx((0.1 + 0.25 + 0.0 + 0.5) / 4, abs=1e-5)
    assert result["logprob_abs_diff_max"] == pytest.approx(0.5)


def test_compare_with_stock_needs_the_same_prompts(capacity):
    with pytest.raises(ValueError):
        capacity.compare_with_stock([sample([1], [-1.0])], [])


def test_stock_server_mirrors_the_graph_settings_of_compressed_ones(capacity, monkeypatch):
    monkeypatch.setenv("SGLANG_KVC_TRITON", "0")
    assert "--disable-decode-cuda-graph" in capacity.stock_settings_like_compressed()
    monkeypatch.setenv("SGLANG_KVC_TRITON", "1")
    flags = capacity.stock_settings_like_compressed()
    assert "--disable-decode-cuda-graph" not in flags and "--disable-prefill-cuda-graph" in flags

