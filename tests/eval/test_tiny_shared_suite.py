"""The tiny model's shared-context suite (eval/tiny/shared_suite.py): its documents and
questions; through the transformers reference path on the CPU, the full cache answers every
question in both modes, and qwen_8x_tuned keeps the needles later questions ask for, whether
the document was compressed with a question in its window or alone; the report's table gives
each mode relative to the full cache.

Thresholds from measurement (python -m eval.tiny.shared_suite --configs configs/qwen_8x_tuned.yaml
configs/qwen_12x_tuned.yaml configs/qwen_5x_tuned.yaml --task multikey --contexts 12 --questions 4
--length 1024 --seed 0, 2026-11-30, docs/results/tiny-shared-reference-multikey-1k-2026-11-30.json):
full 48/48 in both modes; qwen_8x_tuned 48/48 isolated, 40/48 context first; with observation
window 8 since (the same with `--configs configs/qwen_8x_tuned.yaml` alone, 2026-11-30,
tiny-shared-reference-multikey-1k-window8-2026-11-30.json):
48/48 isolated, 47/48 context first. Each threshold sits two answers below its measurement."""

from __future__ import annotations

import pytest

from eval.tiny import quality, tasks
from eval.tiny.shared_suite import markdown, run_reference, shared_context_groups
from sglang_kvc.config import load_config


@pytest.fixture(scope="module")
def evaluator() -> quality.TinyEvaluator:
    return quality.TinyEvaluator(quality.MODEL_DIR, "cpu")


@pytest.fixture(scope="module")
def encode(evaluator) -> tasks.TokenizerPieceEncoder:
    return evaluator.encode


@pytest.fixture(scope="module")
def tokenizer(evaluator):
    return evaluator.tokenizer


def test_groups_share_the_document_and_ask_distinct_records(tokenizer, encode):
    groups = shared_context_groups(encode, contexts=3, questions=4, length=1024, seed=7)
    assert len(groups) == 3
    for group in groups:
        document = tokenizer.decode(list(group.document_ids))
        answers = [expected for _, expected in group.questions]
        assert len(answers) == 4 and len(set(answers)) == 4
        for question_ids, expected in group.questions:
            question = tokenizer.decode(list(question_ids))
            key = question.split("key ")[1].split("?")[0]
            assert f"{key}: {expected}" in document  # the asked record is in the shared document
            assert document.count(expected) == 1
            assert question.endswith(tasks.ANSWER_PREFIX)
            assert len(group.document_ids) + len(question_ids) + tasks.MAX_NEW_TOKENS["kv"] <= 1024


def test_multikey_groups_ask_every_needle_of_a_filler_document(tokenizer, encode):
    groups = shared_context_groups(encode, contexts=3, questions=4, length=2048, seed=7, task="multikey")
    assert len(groups) == 3
    for group in groups:
        document = tokenizer.decode(list(group.document_ids))
        assert document.startswith(tasks.MULTIKEY_HEADER.strip())
        answers = [expected for _, expected in group.questions]
        assert len(answers) == 4 and len(set(answers)) == 4
        for question_ids, expected in group.questions:
            question = tokenizer.decode(list(question_ids))
            key = question.split("number for ")[1].split(" mentioned")[0]
            assert tasks.MULTIKEY_NEEDLE.format(key=key, value=expected) in document
            assert question.endswith(tasks.ANSWER_PREFIX)
            assert len(group.document_ids) + len(question_ids) + tasks.MAX_NEW_TOKENS["multikey"] <= 2048
        # document + question is exactly what a whole prompt encodes to (no merge across the join)
        question_text = tokenizer.decode(list(group.questions[1][0]))
        assert tuple(encode(document + question_text)) == group.document_ids + group.questions[1][0]


def test_shared_task_names_the_allowed_tasks(encode):
    with pytest.raises(ValueError, match="kv.*multikey"):
        shared_context_groups(encode, contexts=1, questions=2, length=1024, seed=0, task="passkey")


def test_the_full_cache_answers_every_question_after_a_cached_document(evaluator):
    groups = shared_context_groups(evaluator.encode, contexts=2, questions=3, length=1024, seed=5, task="multikey")
    result = run_reference(evaluator, "full", None, groups, ("isolated", "context_first"),
                           tasks.MAX_NEW_TOKENS["multikey"])
    expected = [answer for group in groups for _, answer in group.questions]
    assert result["isolated"]["predictions"] == expected
    assert result["context_first"]["predictions"] == expected
    assert result["context_first"]["accuracy"] == 1.0 and result["context_first"]["requests"] == 6


def test_qwen_8x_tuned_keeps_the_needles_of_a_document_cached_before_its_questions(evaluator):
    groups = shared_context_groups(evaluator.encode, contexts=12, questions=4, length=1024, seed=0, task="multikey")
    config = load_config(quality.REPO / "configs" / "qwen_8x_tuned.yaml")
    result = run_reference(evaluator, config.name, config, groups, ("isolated", "context_first"),
                           tasks.MAX_NEW_TOKENS["multikey"])
    assert result["isolated"]["requests"] == result["context_first"]["requests"] == 48
    assert round(result["isolated"]["accuracy"] * 48) >= 46
    assert round(result["context_first"]["accuracy"] * 48) >= 45


def test_markdown_gives_each_mode_relative_to_the_full_cache():
    report = {"modes": ["isolated", "context_first"], "results": [
        {"name": "full", "isolated": {"accuracy": 1.0}, "context_first": {"accuracy": 0.8}},
        {"name": "x", "isolated": {"accuracy": 0.5}, "context_first": {"accuracy": 0.6}},
    ]}
    table = markdown(report)
    assert "| x | 0.500 | 50.0% | 0.600 | 75.0% |" in table
