"""eval/tiny/errors.py: the classes of a tiny model's wrong answers."""

from __future__ import annotations

import json
from random import Random

from eval.tiny import errors, quality, tasks


def vt_sample():
    sample = tasks.vt_sample(Random(3), tasks.approximate_piece_encoder, 1024, depth=0.5)
    assert sample.follow_ups, "a vt sample carries its distractor chains' questions"
    return sample


def test_each_kind_of_wrong_answer():
    sample = vt_sample()
    names = sample.answer.split()
    distractor = sample.follow_ups[0][1]
    assert errors.classify(sample, sample.answer) is None
    assert errors.classify(sample, distractor) == "another question's answer"
    assert errors.classify(sample, " ".join(names[:-1])) == "partial"
    assert errors.classify(sample, " ".join(names[:1] + distractor.split()[1:])) == "mixed"
    assert errors.classify(sample, "QQQQQ") == "other"
    assert errors.classify(sample, "") == "other"


def test_a_report_on_the_bundled_model_accounts_for_every_sample(tmp_path, capsys):
    out = tmp_path / "errors.json"
    assert errors.main(["--model", str(quality.MODEL_DIR), "--task", "kv", "--length", "512", "--samples", "4",
                        "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 4 and report["correct"] + len(report["wrong"]) == 4
    assert sum(report["kinds"].values()) == len(report["wrong"])
    assert all(entry["kind"] in errors.ERROR_KINDS and entry["answer"] != entry["expected"]
               for entry in report["wrong"])
    assert '"task": "kv"' in capsys.readouterr().out
