"""eval/ablate.py's `long` group: every variant at the base config's planned ratio."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval import ablate
from eval.tiny import quality
from sglang_kvc.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_long_variants_sit_at_the_base_ratio_and_differ_in_one_knob():
    base = load_config(REPO / "configs" / "qwen_8x_tuned.yaml")
    target = quality.planned_ratio(base)
    configs = ablate._long(base)
    assert len(configs) == 1 + len(ablate.LONG_VARIANTS)
    for config, (label, sparsity, quantization) in zip(configs[1:], ablate.LONG_VARIANTS):
        assert quality.planned_ratio(config) == pytest.approx(target, abs=0.02), label
        for key, value in sparsity.items():
            assert getattr(config.sparsity, key) == value, label
        for key, value in quantization.items():
            assert getattr(config.quantization, key) == value, label
    by_label = dict(zip((label for label, _, _ in ablate.LONG_VARIANTS), configs[1:]))
    # Sparsity knobs cost no bytes: same retain ratio; more bits per kept token: fewer kept.
    assert by_label["pooling 63"].sparsity.retain_ratio == base.sparsity.retain_ratio
    assert by_label["K4V4 g64"].sparsity.retain_ratio < base.sparsity.retain_ratio
    assert by_label["K3V2 g64"].sparsity.retain_ratio > base.sparsity.retain_ratio


def test_long_group_only_runs_when_asked():
    assert "long" not in ablate.DEFAULT_GROUPS and "long" in ablate.GROUPS
