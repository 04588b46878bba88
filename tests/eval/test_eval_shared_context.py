"""Shared-context suite: context generation and how requests are built and ordered per mode."""

from __future__ import annotations

import re

import pytest

from eval import shared_context
from eval.client import ServerConfig, write_jsonl
from eval.shared_context import GenerateConfig
from eval.tokens import PromptTokenizer
from eval_test_support import build_word_tokenizer

LENGTH = 800
NONCE_LINE = re.compile(r"^Request [0-9a-f]{32}\.\n\n")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = build_word_tokenizer(tmp_path_factory.mktemp("tokenizer"), [], add_bos=False)
    return PromptTokenizer.from_path(str(folder))


@pytest.fixture(scope="module")
def contexts(tokenizer):
    config = GenerateConfig("unused", None, max_seq_length=LENGTH, num_contexts=2, num_questions=3, seed=11)
    return shared_context.generate_contexts(config, tokenizer)


@pytest.fixture
def data_path(contexts, tmp_path):
    path = tmp_path / "contexts.jsonl"
    write_jsonl(path, contexts)
    return path


def test_contexts_are_deterministic_and_fit_the_budget(tokenizer, contexts):
    config = GenerateConfig("unused", None, max_seq_length=LENGTH, num_contexts=2, num_questions=3, seed=11)
    assert shared_context.generate_contexts(config, tokenizer) == contexts
    for context in contexts:
        assert context["length"] <= LENGTH
        assert context["length"] == shared_context.longest_prompt_tokens(tokenizer, context) + 128


def test_each_question_has_its_own_needle_in_the_shared_document(contexts):
    context = contexts[0]
    assert context["document"].startswith("A special magic number is hidden within the following text.")
    assert context["document"].endswith("\n")
    keys = [question["key"] for question in context["questions"]]
    assert len(set(keys)) == 3
    for question in context["questions"]:
        (value,) = question["outputs"]
        assert f"One of the special magic numbers for {question['key']} is: {value}." in context["document"]
        assert question["question"] == f"What is the special magic number for {question['key']} mentioned in the provided text?"
        assert question["answer_prefix"] == f" The special magic number for {question['key']} mentioned in the provided text is"
    assert contexts[0]["document"] != contexts[1]["document"]


def correct_answer(contexts):
    values = {c["document"] + q["question"]: q["outputs"][0] for c in contexts for q in c["questions"]}

    def responder(path, body):
        prompt = NONCE_LINE.sub("", body["prompt"])
        return next(f" {value}." for head, value in values.items() if prompt.startswith(head))

    return responder


def test_shared_mode_sends_identical_prefixes_and_warms_each_context_first(fake_server, contexts, data_path, tmp_path):
    fake_server.responder = correct_answer(contexts)
    server = ServerConfig(base_url=fake_server.url, max_retries=0)
    shared_context.run(data_path, tmp_path / "out", "shared", server, concurrency=4, flush_cache=True)

    assert fake_server.paths()[0] == "/flush_cache"
    completions = fake_server.requests[1:]
    assert len(completions) == 6 and {r.path for r in completions} == {"/v1/completions"}
    documents = [c["document"] for c in contexts]
    # the first question of every context is answered before any follow-up is sent
    first_questions = [r.prompt for r in completions[:2]]
    assert sorted(first_questions) == sorted(d + c["questions"][0]["question"] + c["questions"][0]["answer_prefix"]
                                             for d, c in zip(documents, contexts))
    for context in contexts:
        prompts = [r.prompt for r in completions if r.prompt.startswith(context["document"])]
        assert len(prompts) == 3  # all three questions reuse the exact document prefix
    for request in completions:
        assert request.body["max_tokens"] == 128 and request.body["temperature"] == 0


def test_isolated_mode_prefixes_a_unique_nonce(fake_server, contexts, data_path, tmp_path):
    fake_server.responder = correct_answer(contexts)
    server = ServerConfig(base_url=fake_server.url, max_retries=0)
    shared_context.run(data_path, tmp_path / "out", "isolated", server, concurrency=4)

    prompts = [request.prompt for request in fake_server.requests]
    assert len(prompts) == 6
    nonces = [NONCE_LINE.match(prompt).group(0) for prompt in prompts]
    assert len(set(nonces)) == 6  # nothing shared, not even with another isolated run
    expected = {r["prompt"] for r in shared_context.expand_requests(contexts)}
    assert {NONCE_LINE.sub("", prompt) for prompt in prompts} == expected


def test_context_first_mode_sends_every_document_alone_before_any_question(fake_server, contexts, data_path,
                                                                          tmp_path):
    right = correct_answer(contexts)
    documents = {c["document"] for c in contexts}
    fake_server.responder = lambda path, body: " x" if body["prompt"] in documents else right(path, body)
    server = ServerConfig(base_url=fake_server.url, max_retries=0)
    shared_context.run(data_path, tmp_path / "out", "context_first", server, concurrency=4)

    completions = fake_server.requests
    assert len(completions) == 2 + 6
    # the two documents, alone and for one token, before the six questions
    assert {r.prompt for r in completions[:2]} == documents
    assert all(r.body["max_tokens"] == 1 for r in completions[:2])
    expected = {r["prompt"] for r in shared_context.expand_requests(contexts)}
    assert {r.prompt for r in completions[2:]} == expected
    result = shared_context.score_dir(tmp_path / "out")
    assert result["context_first"]["accuracy"] == 100.0 and result["context_first"]["num_requests"] == 6

    # a resumed run with nothing left sends no document again
    before = len(fake_server.requests)
    shared_context.run(data_path, tmp_path / "out", "context_first", server, concurrency=4)
    assert len(fake_server.requests) == before


def test_score_reports_each_mode_and_the_difference(fake_server, contexts, data_path, tmp_path):
    right = correct_answer(contexts)
    server = ServerConfig(base_url=fake_server.url, max_retries=0)
    fake_server.responder = right
    shared_context.run(data_path, tmp_path / "out", "shared", server, concurrency=2)
    # isolated: every follow-up question (index 1, 2) answered wrong
    first_prompts = {c["document"] + c["questions"][0]["question"] for c in contexts}

    def right_on_first_questions_only(path, body):
        prompt = NONCE_LINE.sub("", body["prompt"])
        return right(path, body) if any(prompt.startswith(p) for p in first_prompts) else " 0000000."

    fake_server.responder = right_on_first_questions_only
    shared_context.run(data_path, tmp_path / "out", "isolated", server, concurrency=2)

    result = shared_context.score_dir(tmp_path / "out")
    assert result["shared"] == {"accuracy": 100.0, "first_question": 100.0, "follow_up_questions": 100.0,
                                "num_requests": 6}
    # isolated: 2 of 6 right -> 33.33; first questions 2/2; follow-ups 0/4
    assert result["isolated"] == {"accuracy": 33.33, "first_question": 100.0, "follow_up_questions": 0.0,
                                  "num_requests": 6}
    assert result["shared_minus_isolated"] == 66.67
