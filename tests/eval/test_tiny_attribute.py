"""eval/tiny/attribute.py: a lost sample put down to eviction or quantization, on the bundled
tiny model through the reference path (CPU, passkey at 512 tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.ablate import variant
from eval.tiny import attribute, paired, quality
from sglang_kvc.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SUITE = {"tasks": ["passkey"], "lengths": [512], "samples": 4, "seed": 5}


@pytest.fixture(scope="module")
def evaluator() -> quality.TinyEvaluator:
    return quality.TinyEvaluator(quality.MODEL_DIR, "cpu")


def report_with(answers_by_config: dict) -> dict:
    """A reference-path report of SUITE whose configs answered as given ({config: {id: answer}})."""
    return {"suite": SUITE, "predictions": answers_by_config}


def test_each_cause_from_the_probes_that_answer_right():
    def right(*probes):
        return {probe: probe in probes for probe in ("as configured", "kept tokens in bf16", "every token kept")}

    assert attribute.cause(right("as configured", "every token kept")) == "not reproduced"
    assert attribute.cause(right("kept tokens in bf16")) == "quantization"
    assert attribute.cause(right("every token kept")) == "eviction"
    assert attribute.cause(right("kept tokens in bf16", "every token kept")) == "either"
    assert attribute.cause(right()) == "both"


def test_a_sample_lost_to_eviction_and_one_the_reference_path_answers(evaluator, tmp_path, capsys):
    """A control config like test_tiny_quality's (2% of the prompt kept, unquantized) loses pass
    keys to eviction alone; a shipped config's reported failure on a sample it answers right
    on the reference path is `not reproduced`."""
    samples = paired.held_out_samples(report_with({}), evaluator)
    control = variant(load_config(CONFIGS / "qwen_8x.yaml"), "control", sparsity={"retain_ratio": 0.02, "budget": "uniform"},
                      quantization={"guard_fraction": 1.0})
    lost_by_control = next(key for key, sample in samples.items() if evaluator.answer(sample, control)[0] != sample.answer)
    tuned = load_config(CONFIGS / "qwen_5x_tuned.yaml")
    answered_by_tuned = next(key for key, sample in samples.items()
                             if key != lost_by_control and evaluator.answer(sample, tuned)[0] == sample.answer)
    gold = {key: sample.answer for key, sample in samples.items()}
    report = report_with({
        "full": gold,
        "control": {**gold, lost_by_control: "0"},
        "qwen_5x_tuned": {**gold, answered_by_tuned: "0"},
    })

    evicted = attribute.attribute([report], "full", control, evaluator)
    assert evicted["lost"] == 1 and evicted["samples"][0]["id"] == lost_by_control
    assert evicted["causes"]["eviction"] == 1
    assert evicted["reproduced"] == 1
    assert evicted["fixed_by"]["every token kept"] == 1 and evicted["fixed_by"]["kept tokens in bf16"] == 0

    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    out = tmp_path / "attribution.json"
    assert attribute.main([str(path), "full", str(CONFIGS / "qwen_5x_tuned.yaml"), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["lost"] == 1 and written["causes"]["not reproduced"] == 1 and written["reproduced"] == 0
    assert written["samples"][0]["reported"] == "0"
    assert "1 samples right with `full` and wrong with `qwen_5x_tuned`, 0 of them" in capsys.readouterr().out


def test_the_baseline_may_come_from_another_report_of_the_same_suite():
    config_only = {"suite": SUITE, "predictions": {"qwen_8x_tuned": {"passkey-512-0": "1"}}}
    baseline_only = {"suite": SUITE, "predictions": {"full": {"passkey-512-0": "2"}, "other": {}}}
    merged = attribute.with_baseline_from(config_only, baseline_only, "full")
    assert merged["predictions"] == {"qwen_8x_tuned": {"passkey-512-0": "1"}, "full": {"passkey-512-0": "2"}}
    with pytest.raises(ValueError, match="different suites"):
        attribute.with_baseline_from(config_only, {**baseline_only, "suite": {**SUITE, "seed": 6}}, "full")


def test_only_the_cells_asked_for(evaluator):
    samples = paired.held_out_samples(report_with({}), evaluator)
    gold = {key: sample.answer for key, sample in samples.items()}
    report = report_with({"full": gold, "c": {key: "0" for key in gold}})
    assert len(attribute.lost_samples(report, "full", "c", evaluator)) == 4
    assert len(attribute.lost_samples(report, "full", "c", evaluator, cells=["passkey-512"])) == 4
    assert attribute.lost_samples(report, "full", "c", evaluator, cells=["kv-512", "passkey-1024"]) == []
