"""eval/server_capacity.py's comparison with the stock run (the GPU script itself needs a server)."""

from __future__ import annotations

import importlib.util
import sys
import random
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


def test_the_wall_ends_with_the_last_request_not_at_a_poll(capacity, monkeypatch):
    """The stall watch polls every 0.2 s; a wall read after it was off by up to that much."""
    def fake_generate(url, prompt, max_new_tokens, logprobs=False):
        time.sleep(0.05 + 0.01 * prompt[0])  # the last returns after 0.1 s
        return {"completion_tokens": max_new_tokens}

    monkeypatch.setattr(capacity, "generate", fake_generate)
    wall, results = capacity.concurrently("u", [[i] for i in range(6)], 4)
    assert 0.1 <= wall < 0.19 and len(results) == 6


def test_identical_prompts_are_sent_at_once_and_must_agree(capacity, monkeypatch):
    sent = []

    def fake_concurrently(url, prompts, max_new_tokens):
        sent.append(prompts)
        heads = [[7, 8]] * (len(prompts) - 1) + [[7, 9]]  # the last copy answers differently
        return 0.5, [{"completion_tokens": max_new_tokens, "output_ids_head": h, "cached_tokens": 0} for h in heads]

    monkeypatch.setattr(capacity, "concurrently", fake_concurrently)
    result = capacity.identical_prompts("u", random.Random(0), 4, 16, 3)
    assert len(sent) == 1 and len(sent[0]) == 4 and len({tuple(p) for p in sent[0]}) == 1 and len(sent[0][0]) == 16
    assert result["completed"] == 4 and not result["same_output"] and not result["ok"]


class StreamingServer:
    """A local HTTP server answering /generate with server-sent events as SGLang does
    (`data: {json}` per chunk with cumulative output_ids, then `data: [DONE]`), one chunk
    per token after `first_s`, then `gap_s` apart."""

    def __init__(self, tokens: int, first_s: float, gap_s: float, error: bool = False):
        import http.server
        import json as json_module

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server naming)
                body = json_module.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                time.sleep(first_s)
                for count in range(1, tokens + 1):
                    chunk = ({"error": {"message": "boom"}} if error and count == 2 else
                             {"output_ids": list(range(count)),
                              "meta_info": {"prompt_tokens": 4, "cached_tokens": 3, "completion_tokens": count}})
                    self.wfile.write(b"data: " + json_module.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(gap_s)
                self.wfile.write(b"data: [DONE]\n\n")

            def log_message(self, *args):
                pass

        self.bodies: list[dict] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def test_a_streamed_request_reports_its_first_token_and_the_decode_time_per_token(capacity):
    with StreamingServer(tokens=6, first_s=0.3, gap_s=0.05) as url:
        record = capacity.generate(url, [1, 2, 3, 4], max_new_tokens=6, stream=True)
    assert record["completion_tokens"] == 6 and record["cached_tokens"] == 3
    assert record["output_ids_head"] == [0, 1, 2, 3, 4, 5]
    assert 0.3 <= record["ttft_s"] < 0.45
    # 5 tokens after the first, 50 ms apart
    assert 45 <= record["decode_ms_per_token"] < 80
    assert record["latency_s"] >= record["ttft_s"]


def test_a_stream_that_reports_an_error_fails_loudly(capacity):
    with StreamingServer(tokens=3, first_s=0.0, gap_s=0.0, error=True) as url:
        with pytest.raises(RuntimeError, match="boom"):
            capacity.generate(url, [1], max_new_tokens=3, stream=True)


def test_token_timing_of_one_chunk_has_no_decode_rate(capacity):
    assert capacity.token_timing([(0.2, 1)]) == {"ttft_s": 0.2, "decode_ms_per_token": None}
    assert capacity.token_timing([]) == {"ttft_s": None, "decode_ms_per_token": None}
    # chunks of several tokens (SGLang's stream interval): the rate is over tokens, not chunks
    assert capacity.token_timing([(0.1, 1), (0.2, 5), (0.3, 9)])["decode_ms_per_token"] == 25.0


def test_a_profiled_send_summarizes_each_stage_over_its_own_steps(capacity, monkeypatch, tmp_path):
    """SGLang writes one trace per stage; the prefill trace holds one step, the decode trace
    `steps` steps; traces already in the folder (an earlier profile) are not taken."""
    import gzip
    import json as json_module

    def write_trace(name, span_us):
        events = [{"ph": "X", "cat": "kernel", "name": "k", "ts": 0, "dur": span_us, "pid": 0, "tid": 0}]
        with gzip.open(tmp_path / name, "wt") as handle:
            json_module.dump({"traceEvents": events}, handle)

    write_trace("old-DECODE.trace.json.gz", 1)
    posted = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

        def read(self):
            return b"{}"

    def fake_urlopen(request, timeout):
        posted.append((request.full_url, json_module.loads(request.data)))
        return Response()

    monkeypatch.setattr(capacity.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(capacity.time, "sleep", lambda seconds: None)
    monkeypatch.syspath_prepend(str(REPO / "eval"))

    def send():
        write_trace("new-EXTEND.trace.json.gz", 6000)
        write_trace("new-DECODE.trace.json.gz", 8000)

    summaries = capacity.profiled("http://x", tmp_path, steps=4, send=send, stages=("EXTEND", "DECODE"))
    assert posted[0][0] == "http://x/start_profile"
    assert posted[0][1]["num_steps"] == 4 and posted[0][1]["profile_by_stage"]
    assert summaries["EXTEND"]["trace"] == "new-EXTEND.trace.json.gz"
    assert summaries["EXTEND"]["gpu_busy_ms"] == pytest.approx(6.0)  # one step
    assert summaries["DECODE"]["trace"] == "new-DECODE.trace.json.gz"
    assert summaries["DECODE"]["gpu_busy_ms"] == pytest.approx(2.0)  # 8 ms over 4 steps


def test_a_stage_whose_trace_never_comes_times_out(capacity, monkeypatch, tmp_path):
    monkeypatch.setattr(capacity.urllib.request, "urlopen",
                        lambda request, timeout: type("R", (), {"__enter__": lambda s: s, "read": lambda s: b"{}",
                                                                "__exit__": lambda s, *a: False})())
    monkeypatch.syspath_prepend(str(REPO / "eval"))
    with pytest.raises(TimeoutError, match="EXTEND"):
        capacity.profiled("http://x", tmp_path, steps=2, send=lambda: None, stages=("EXTEND",), timeout=0.5)


def test_repeated_prompts_are_sent_in_order_and_need_all_but_the_last_token_cached(capacity):
    """`--repeat-earlier` sends each earlier prompt again before the last one's repeats; a
    repeat is ok only when the radix cache supplied all but its last token (the fake server
    reports 3 cached tokens: enough for a 4-token prompt, not for a 5-token one)."""
    server = StreamingServer(tokens=2, first_s=0.0, gap_s=0.0)
    with server as url:
        repeats = capacity.repeat_prompts(url, [[1, 2, 3, 4], [5, 6, 7, 8, 9]], 2, max_new_tokens=2)
    sent = [body["input_ids"] for body in server.bodies]
    assert sent == [[1, 2, 3, 4]] * 2 + [[5, 6, 7, 8, 9]] * 2
    assert [repeat["ok"] for repeat in repeats] == [True, True, False, False]
    assert all(repeat["ttft_s"] >= 0 for repeat in repeats)
