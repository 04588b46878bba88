"""eval.tiny.depth: right answers per needle-depth range, from the depths the samples were drawn at."""

from __future__ import annotations

import pytest

from eval.tiny import tasks
from eval.tiny.depth import main, markdown, right_by_depth


def test_needle_depth_is_where_eval_samples_put_it():
    assert [tasks.needle_depth(i, 4) for i in range(4)] == [0.125, 0.375, 0.625, 0.875]


def test_right_answers_fall_in_their_depth_bins():
    gold = {f"kv-8192-{i}": str(i) for i in range(8)} | {"vt-1024-0": "x", "vt-1024-7": "y"}
    answers = {key: value for key, value in gold.items()}
    for wrong in ("kv-8192-0", "kv-8192-1", "kv-8192-5", "vt-1024-7"):
        answers[wrong] = "?"
    table = right_by_depth(answers, gold, samples=8, bins=2)
    # depths (i + 0.5) / 8: indices 0-3 in the first half, 4-7 in the second
    assert table == {"kv-8192": [[2, 4], [3, 4]], "vt-1024": [[1, 1], [0, 1]]}
    assert right_by_depth(answers, gold, samples=8, bins=1) == {"kv-8192": [[5, 8]], "vt-1024": [[1, 2]]}
    assert "| c | kv-8192 | 2 / 4 | 3 / 4 |" in markdown({"c": table}, 2)
    assert "needle at 0-50% | needle at 50-100%" in markdown({"c": table}, 2)


def test_bins_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "report.json"), "--bins", "0"])


def test_sample_ids_name_their_cell_and_index():
    assert tasks.sample_id("kv", 8192, 3) == "kv-8192-3"
    assert tasks.cell_and_index("kv-8192-3") == ("kv-8192", 3)
