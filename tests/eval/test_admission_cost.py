"""eval/admission_cost.py: the admission check's cost against the radix cache's size."""

from __future__ import annotations

import json
from pathlib import Path

from eval import admission_cost

REPO = Path(__file__).resolve().parents[2]


def test_admission_cost_against_a_tree_of_cached_prompts(tmp_path):
    out = tmp_path / "admission.json"
    assert admission_cost.main(["--out", str(out), "--config", str(REPO / "configs" / "qwen_8x_tuned.yaml"),
                                "--nodes", "5", "20", "--tokens-per-node", "4"]) == 0
    report = json.loads(out.read_text())
    for nodes in (5, 20):
        row = report["by_nodes"][str(nodes)]
        assert row["evictable_tokens"] == 4 * nodes  # every prompt cached as its own unlocked node
        assert row["past_early_exit"]  # what the server pays once rows run short
        assert row["admission_ms"] > 0 and row["tree_walk_ms"] > 0
