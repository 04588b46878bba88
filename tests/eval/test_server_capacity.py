"""eval/server_capacity.py's comparison with the stock run (the GPU script itself needs a server)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
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
    # --kv-compress leaves the overlap scheduler as the user set it, so stock does too.
    assert "--disable-overlap-schedule" not in flags


def test_fidelity_prompts_at_once_are_the_sequential_ones_sent_together(capacity, monkeypatch):
    sequential, together = [], []

    def fake_generate(url, prompt, max_new_tokens, logprobs=False):
        sequential.append(prompt)
        return {"output_ids": prompt[:2], "output_logprobs": [-1.0, -2.0], "cached_tokens": 0, "latency_s": 0.1}

    def fake_concurrently(url, prompts, max_new_tokens, logprobs=False):
        assert logprobs
        together.extend(prompts)
        return 1.0, [fake_generate(url, p, max_new_tokens) for p in prompts]

    monkeypatch.setattr(capacity, "generate", fake_generate)
    monkeypatch.setattr(capacity, "concurrently", fake_concurrently)
    one_by_one = capacity.fidelity_samples("http://x", seed=3, count=4, prompt_len=16, max_new_tokens=2)
    sent_one_by_one = list(sequential)
    at_once = capacity.fidelity_samples("http://x", seed=3, count=4, prompt_len=16, max_new_tokens=2, at_once=True)
    assert together == sent_one_by_one and len(set(map(tuple, together))) == 4
    assert at_once == one_by_one and set(at_once[0]) == {"output_ids", "output_logprobs", "cached_tokens"}


def test_fidelity_at_once_fails_loudly_when_a_request_fails(capacity, monkeypatch):
    monkeypatch.setattr(capacity, "concurrently",
                        lambda url, prompts, new, logprobs=False: (1.0, [{"error": "HTTPError: 500"}] * len(prompts)))
    with pytest.raises(RuntimeError, match="2 of 2 fidelity requests failed: HTTPError: 500"):
        capacity.fidelity_samples("http://x", seed=0, count=2, prompt_len=8, max_new_tokens=2, at_once=True)



def test_batch_decode_reports_the_median_round_and_the_range(capacity, monkeypatch):
    """Rounds of (prefill-only, full) walls: 16 x 127 decode tokens over full - prefill seconds."""
    walls = iter([0.5,  # warm-up
                  1.0, 2.0,  # 2032 tok/s
                  1.0, 3.0,  # 1016 tok/s
                  1.2, 2.2])  # 2032 tok/s
    sent = []

    def fake_concurrently(url, prompts, max_new_tokens, logprobs=False):
        sent.append((len(prompts), max_new_tokens))
        return next(walls), [{"completion_tokens": max_new_tokens} for _ in prompts]

    monkeypatch.setattr(capacity, "concurrently", fake_concurrently)
    import random

    summary = capacity.batch_decode("http://x", random.Random(0), batch=16, prompt_len=8, max_new_tokens=128, rounds=3)
    assert sent == [(16, 2)] + [(16, 1), (16, 128)] * 3
    assert [r["decode_tokens_per_s"] for r in summary["per_round"]] == [2032.0, 1016.0, 2032.0]
    assert summary["decode_tokens_per_s"] == 2032.0 and summary["decode_tokens_per_s_range"] == [1016.0, 2032.0]
    assert summary["prefill_wall_s"] == 1.0 and summary["full_wall_s"] == 2.2
    assert summary["ok"] and summary["completed"] == 16


def test_several_batch_shapes_on_one_server(capacity, monkeypatch):
    """The first shape stays under "batch_decode" (earlier reports' key), the others follow."""
    monkeypatch.setattr(capacity, "concurrently",
                        lambda url, prompts, max_new_tokens: (0.1 * max_new_tokens, [
                            {"completion_tokens": max_new_tokens} for _ in prompts]))
    import random

    one = capacity.batch_decode_shapes("http://x", random.Random(0), [[16, 8, 32]], rounds=1)
    assert set(one) == {"batch_decode"} and one["batch_decode"]["batch"] == 16
    two = capacity.batch_decode_shapes("http://x", random.Random(0), [[16, 8, 32], [64, 4, 8]], rounds=2)
    assert two["batch_decode"]["batch"] == 16
    assert [(r["batch"], r["prompt_len"], r["max_new_tokens"], r["rounds"]) for r in two["batch_decode_more"]] == [
        (64, 4, 8, 2)]
    # 64 x 7 decode tokens over (0.8 - 0.1) s
    assert two["batch_decode_more"][0]["decode_tokens_per_s"] == 640.0


def test_a_round_with_failed_requests_has_no_throughput(capacity, monkeypatch):
    """A crashed server refuses connections at once: full - prefill wall is tiny, and the
    throughput it implies (millions of tokens/s) must not be reported."""
    walls = iter([0.5, 1.0, 2.0, 0.01, 0.012])

    def fake_concurrently(url, prompts, max_new_tokens):
        wall = next(walls)
        if wall < 0.1:
            return wall, [{"error": "URLError: Connection refused"} for _ in prompts]
        return wall, [{"completion_tokens": max_new_tokens} for _ in prompts]

    monkeypatch.setattr(capacity, "concurrently", fake_concurrently)
    import random

    summary = capacity.batch_decode("http://x", random.Random(0), batch=4, prompt_len=8, max_new_tokens=11, rounds=2)
    assert [r["decode_tokens_per_s"] for r in summary["per_round"]] == [40.0, None]
    assert summary["decode_tokens_per_s"] == 40.0 and summary["completed"] == 0
    assert not summary["ok"] and summary["errors"]


def test_staggered_arrivals_send_the_seeded_schedule_and_count_what_completed(capacity, monkeypatch):
    """Every server gets the same schedule from the same seed; each request asks for
    NEW/2..NEW tokens; a failed one is reported and makes the run not ok."""
    import random

    sent = []

    def fake_generate(url, prompt, max_new_tokens, logprobs=False):
        sent.append((len(prompt), max_new_tokens))
        if len(sent) == 3 and fail:
            raise ConnectionError("refused")
        return {"completion_tokens": max_new_tokens, "output_ids": [1] * max_new_tokens}

    monkeypatch.setattr(capacity, "generate", fake_generate)
    fail = False
    first = capacity.staggered_arrivals("http://x", random.Random(3), count=6, rate=500.0, prompt_len=5,
                                        max_new_tokens=8)
    schedule = sorted(sent)
    assert first["ok"] and first["completed"] == 6 and first["errors"] == []
    assert all(length == 5 and 4 <= new <= 8 for length, new in sent)
    # (wall_s is rounded to ms, so the quotient only roughly)
    assert first["output_tokens_per_s"] == pytest.approx(sum(new for _, new in sent) / first["wall_s"], rel=0.1)
    assert first["latency_s"]["median"] <= first["latency_s"]["p90"] <= first["latency_s"]["max"]
    sent.clear()
    fail = True
    second = capacity.staggered_arrivals("http://x", random.Random(3), count=6, rate=500.0, prompt_len=5,
                                         max_new_tokens=8)
    assert sorted(sent) == schedule  # the same lengths for the same seed
    assert not second["ok"] and second["completed"] == 5 and second["errors"] == ["ConnectionError: refused"]


def test_requests_that_stop_finishing_are_diagnosed_once_and_not_waited_for(capacity, monkeypatch):
    release = threading.Event()

    def fake_generate(url, prompt, max_new_tokens, logprobs=False):
        if prompt[0] % 2:  # odd prompts hang, as on a stalled server
            release.wait(30)
        return {"completion_tokens": max_new_tokens}

    monkeypatch.setattr(capacity, "generate", fake_generate)
    stalls = []
    start = time.perf_counter()
    wall, results = capacity.concurrently("u", [[i] for i in range(6)], 4, stall_s=0.5,
                                          on_stall=lambda: stalls.append(time.perf_counter() - start))
    release.set()
    assert len(stalls) == 1 and stalls[0] >= 0.5 and wall < 10
    assert [r.get("completion_tokens") for r in results[0::2]] == [4, 4, 4]
    assert all(r["error"].startswith("stalled") for r in results[1::2])


def test_requests_that_keep_finishing_are_not_a_stall(capacity, monkeypatch):
    def fake_generate(url, prompt, max_new_tokens, logprobs=False):
        time.sleep(0.15 * prompt[0])  # one finishes every 0.15 s, the last after 0.75 s
        return {"completion_tokens": max_new_tokens}

    monkeypatch.setattr(capacity, "generate", fake_generate)
    wall, results = capacity.concurrently("u", [[i] for i in range(6)], 4, stall_s=0.5,
                                          on_stall=lambda: pytest.fail("not a stall"))
    assert all(r == {"completion_tokens": 4} for r in results)
