"""The tiny model's shared-context suite through the transformers reference path, on the CPU
(eval/tiny/shared_suite.py): the full cache answers every question in both modes; qwen_8x_tuned
keeps the needles later questions ask for, whether the document was compressed with a
question in its window or alone; the report's table gives each mode relative to the full cache.

Thresholds from measurement (python -m eval.tiny.shared_suite --configs configs/qwen_8x_tuned.yaml
configs/qwen_12x_tuned.yaml configs/qwen_5x_tuned.yaml --task multikey --contexts 12 --questions 4
--length 1024 --seed 0, 2026-11-30, docs/results/tiny-shared-reference-multikey-1k-2026-11-30.json):
full 48/48 in both modes; qwen_8x_tuned 48/48 isolated, 40/48 context first. Each threshold
sits two answers below its measurement."""

from __future__ import annotations

import pytest

from eval.tiny import quality, tasks
from sglang_kvc.config import load_config
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


def test_qwen_8x_tuned_keeps_the_needles_of_a_document_cached_before_its_questions(evaluator):
    groups = shared_context_groups(evaluator.encode, contexts=12, questions=4, length=1024, seed=0, task="multikey")
    config = load_config(quality.REPO / "configs" / "qwen_8x_tuned.yaml")
    result = run_reference(evaluator, config.name, config, groups, ("isolated", "context_first"),
                           tasks.MAX_NEW_TOKENS["multikey"])
    assert result["isolated"]["requests"] == result["context_first"]["requests"] == 48
    assert round(result["isolated"]["accuracy"] * 48) >= 46
    assert round(result["context_first"]["accuracy"] * 48) >= 38


def test_markdown_gives_each_mode_relative_to_the_full_cache():
    report = {"modes": ["isolated", "context_first"], "results": [
        {"name": "full", "isolated": {"accuracy": 1.0}, "context_first": {"accuracy": 0.8}},
        {"name": "x", "isolated": {"accuracy": 0.5}, "context_first": {"accuracy": 0.6}},
    ]}
    table = markdown(report)
    assert "| x | 0.500 | 50.0% | 0.600 | 75.0% |" in table
