"""The shared HTTP client, retry policy and resumable results file."""

from __future__ import annotations

import socket

import pytest

from eval.client import (
    GenerationParams,
    OpenAICompatClient,
    RequestFailed,
    ResultsFile,
    ServerConfig,
    read_jsonl,
    run_pending,
)

FAST_RETRIES = {"max_retries": 3, "backoff_s": 0.001}


def client_for(server, **config) -> OpenAICompatClient:
    return OpenAICompatClient(ServerConfig(base_url=server.url, **{**FAST_RETRIES, **config}))


def test_completion_and_chat_payloads(fake_server):
    fake_server.responder = lambda path, body: "OK"
    with client_for(fake_server, model="qwen") as client:
        assert client.complete("raw text", GenerationParams(max_tokens=7)) == "OK"
        assert client.chat("hello", GenerationParams(max_tokens=9, temperature=0.1, stop=("\n",))) == "OK"
    completion, chat = fake_server.requests
    assert completion.path == "/v1/completions"
    assert completion.body == {"model": "qwen", "prompt": "raw text", "max_tokens": 7, "temperature": 0.0}
    assert chat.path == "/v1/chat/completions"
    assert chat.body == {"model": "qwen", "messages": [{"role": "user", "content": "hello"}],
                         "max_tokens": 9, "temperature": 0.1, "stop": ["\n"]}


def test_transient_errors_are_retried(fake_server):
    fake_server.failures_to_inject = [503, 429, 500]
    with client_for(fake_server) as client:
        assert client.complete("p", GenerationParams(4)) == "p"  # echo_tail answers the prompt's tail
    assert len(fake_server.requests) == 4


def test_retries_are_bounded(fake_server):
    fake_server.failures_to_inject = [503] * 10
    with client_for(fake_server, max_retries=2) as client, pytest.raises(RequestFailed, match="3 attempts"):
        client.complete("p", GenerationParams(4))
    assert len(fake_server.requests) == 3


def test_client_errors_are_not_retried(fake_server):
    fake_server.failures_to_inject = [400]
    with client_for(fake_server) as client, pytest.raises(RequestFailed, match="HTTP 400"):
        client.complete("p", GenerationParams(4))
    assert len(fake_server.requests) == 1


def test_connection_errors_are_retried_then_fail():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServerConfig(base_url=f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.001)
    with OpenAICompatClient(config) as client, pytest.raises(RequestFailed, match="ConnectError"):
        client.complete("p", GenerationParams(4))


def test_flush_cache_accepts_plain_text_reply(fake_server):
    with client_for(fake_server) as client:
        client.flush_cache()
    assert fake_server.paths() == ["/flush_cache"]


def test_run_pending_writes_successes_only_and_resumes(tmp_path):
    results = ResultsFile(tmp_path / "out.jsonl", id_field="id")
    items = [{"id": i} for i in range(5)]

    def flaky(item):
        if item["id"] == 3:
            raise RuntimeError("server said no")
        if item["id"] == 4:
            return None  # skipped: not written, retried next time
        return {"id": item["id"], "pred": f"answer {item['id']}"}

    summary = run_pending(items, flaky, results, concurrency=2, description="test")
    assert (summary.completed, summary.failed, summary.skipped, summary.already_done) == (3, 1, 1, 0)
    assert results.done_ids() == {"0", "1", "2"}

    seen = []
    summary = run_pending(items, lambda item: seen.append(item["id"]) or {"id": item["id"]}, results, 2, "test")
    assert sorted(seen) == [3, 4]
    assert (summary.completed, summary.already_done) == (2, 3)
    assert sorted(r["id"] for r in read_jsonl(results.path)) == [0, 1, 2, 3, 4]


def test_results_file_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "pr', encoding="utf-8")
    results = ResultsFile(path, id_field="id")
    assert results.done_ids() == {"a"}
    results.append({"id": "c"})
    assert [r["id"] for r in results.records()] == ["a", "c"]
