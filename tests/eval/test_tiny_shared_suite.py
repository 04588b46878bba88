"""The tiny model's shared-context suite through the transformers reference path, on the CPU
(eval/tiny/shared_suite.py): the full cache answers every question in both modes, and the
report's table gives each mode relative to the full cache."""

from __future__ import annotations

import pytest

from eval.tiny import quality, tasks
from eval.tiny.shared_suite import markdown, run_reference, shared_context_groups


@pytest.fixture(scope="module")
def evaluator() -> quality.TinyEvaluator:
    return quality.TinyEvaluator(quality.MODEL_DIR, "cpu")


def test_the_full_cache_answers_every_question_after_a_cached_document(evaluator):
    groups = shared_context_groups(evaluator.encode, contexts=2, questions=3, length=1024, seed=5, task="multikey")
    result = run_reference(evaluator, "full", None, groups, ("isolated", "context_first"),
                           tasks.MAX_NEW_TOKENS["multikey"])
    expected = [answer for group in groups for _, answer in group.questions]
    assert result["isolated"]["predictions"] == expected
    assert result["context_first"]["predictions"] == expected
    assert result["context_first"]["accuracy"] == 1.0 and result["context_first"]["requests"] == 6


def test_markdown_gives_each_mode_relative_to_the_full_cache():
    report = {"modes": ["isolated", "context_first"], "results": [
        {"name": "full", "isolated": {"accuracy": 1.0}, "context_first": {"accuracy": 0.8}},
        {"name": "x", "isolated": {"accuracy": 0.5}, "context_first": {"accuracy": 0.6}},
    ]}
    table = markdown(report)
    assert "| x | 0.500 | 50.0% | 0.600 | 75.0% |" in table
