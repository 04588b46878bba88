"""LongBench v2: prompt filling, answer extraction, the run path and split accuracies."""

from __future__ import annotations

import json

import pytest

from eval import longbench_v2
from eval.client import ServerConfig, read_jsonl
from eval.longbench_v2 import V2RunConfig, extract_answer, fill_template
from eval_test_support import FIXTURES

DATA_PATH = FIXTURES / "longbench_v2" / "data.json"
ITEMS = json.loads(DATA_PATH.read_text(encoding="utf-8"))

# Per question: what the fake model answers.
RESPONSES = {
    "Which city has the Eiffel Tower?": "The correct answer is (B)",  # v2-1, answer B: right
    "Where was the composer born?": "The correct answer is **C**.",  # v2-2, answer C: right once * is removed
    "Which city has the Colosseum?": "The answer is probably A",  # v2-3, answer A: no match -> None, wrong
    "Which city has the Belem Tower?": "",  # v2-4: empty -> left out, as upstream
}


def responder(path: str, body: dict) -> str:
    prompt = body["messages"][0]["content"]
    return next(response for question, response in RESPONSES.items() if question in prompt)


@pytest.fixture
def tokenizer_dir(word_tokenizer):
    return word_tokenizer([longbench_v2.TEMPLATE_0SHOT, longbench_v2.TEMPLATE_0SHOT_COT_ANSWER])


def test_templates_are_verbatim():
    assert longbench_v2.TEMPLATE_0SHOT.startswith("Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>")
    assert longbench_v2.TEMPLATE_0SHOT.endswith('Format your response as follows: "The correct answer is (insert answer here)".')
    assert longbench_v2.TEMPLATE_0SHOT_COT.startswith("Please read the following text and answer the questions below.")
    assert longbench_v2.TEMPLATE_0SHOT_COT.endswith("(D) $C_D$\n\nLet\u2019s think step by step:")  # U+2019, no newline
    assert "The text is too long and omitted here." in longbench_v2.TEMPLATE_0SHOT_COT_ANSWER
    assert "Let\u2019s think step by step: $COT$\n\nBased on the above" in longbench_v2.TEMPLATE_0SHOT_COT_ANSWER


def test_fill_template_strips_fields():
    prompt = fill_template(longbench_v2.TEMPLATE_0SHOT, ITEMS[0])
    assert "<text>\nContext of v2-1: a long story about European capitals.\n</text>" in prompt
    assert "What is the correct answer to this question: Which city has the Eiffel Tower?\nChoices:\n(A) Rome\n(B) Paris\n" in prompt
    assert "$" not in prompt


def test_extract_answer():
    assert extract_answer("The correct answer is (C)") == "C"
    assert extract_answer("**The correct answer is (D)**") == "D"
    assert extract_answer("The correct answer is **(A)**") == "A"  # only matches once * is deleted
    assert extract_answer("The correct answer is B, because") == "B"
    assert extract_answer("The correct answer is (E)") is None
    assert extract_answer("I think it is A") is None


def test_run_and_score(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = responder
    config = V2RunConfig(DATA_PATH, tmp_path, str(tokenizer_dir), concurrency=2)
    summary = longbench_v2.run(config, ServerConfig(base_url=fake_server.url, max_retries=0))
    assert (summary.completed, summary.skipped) == (3, 1)

    assert {request.path for request in fake_server.requests} == {"/v1/chat/completions"}
    for request in fake_server.requests:
        assert request.body["temperature"] == 0.1 and request.body["max_tokens"] == 128
    records = {r["_id"]: r for r in read_jsonl(config.output_path)}
    assert sorted(records) == ["v2-1", "v2-2", "v2-3"]  # v2-4 returned "" and is left out
    assert [records[i]["pred"] for i in ("v2-1", "v2-2", "v2-3")] == ["B", "C", None]
    assert records["v2-2"]["response"] == "The correct answer is **C**."

    result = longbench_v2.score(list(records.values()))
    # judged: v2-1 easy/short right, v2-2 hard/medium right, v2-3 hard/long wrong
    # Overall 2/3 = 66.7; Easy 1/1; Hard 1/2; Short 1/1; Medium 1/1; Long 0/1
    assert result["accuracy"] == {"Overall": 66.7, "Easy": 100.0, "Hard": 50.0, "Short": 100.0,
                                  "Medium": 100.0, "Long": 0.0}
    assert result["counts"]["Overall"] == 3


def test_cot_makes_two_passes(fake_server, tokenizer_dir, tmp_path):
    def cot_responder(path, body):
        prompt = body["messages"][0]["content"]
        if prompt.endswith("Let\u2019s think step by step:"):
            return "  The tower is in Paris.  "
        return "The correct answer is (B)"

    fake_server.responder = cot_responder
    config = V2RunConfig(DATA_PATH, tmp_path, str(tokenizer_dir), cot=True, temperature=0.0, limit=1)
    longbench_v2.run(config, ServerConfig(base_url=fake_server.url, max_retries=0))
    first, second = fake_server.requests
    assert first.body["max_tokens"] == 1024 and second.body["max_tokens"] == 128
    assert second.prompt.startswith("Please read the following text and answer the questions below.\n\nThe text is too long")
    assert "Let\u2019s think step by step: The tower is in Paris.\n\nBased on the above" in second.prompt  # stripped
    assert first.body["temperature"] == 0.0
    (record,) = read_jsonl(tmp_path / "longbench_v2_cot.jsonl")
    assert record["response_cot"] == "The tower is in Paris." and record["judge"] is True


def test_prompt_over_budget_is_middle_truncated(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = lambda path, body: "The correct answer is (A)"
    config = V2RunConfig(DATA_PATH, tmp_path, str(tokenizer_dir), max_length=10, limit=1)
    longbench_v2.run(config, ServerConfig(base_url=fake_server.url, max_retries=0))
    # ids = <s> + tokens; keep ids[:5] = <s> Please read the following, and ids[-5:] = the last 5
    # tokens of '... is (insert answer here)".' = ( insert answer here )". (punctuation runs are one
    # token here); decoded in one piece, <s> skipped, tokens joined by spaces
    assert fake_server.requests[0].prompt == 'Please read the following ( insert answer here )".'
