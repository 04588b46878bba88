"""Paired comparison of two configs of one `eval.ablate` / `eval.tiny.quality` /
`eval/tiny/serve_eval.py` report: the same held-out samples, so count the samples only one
of them answers right.

    python -m eval.tiny.paired DIR/ablation.json "long: base (qwen_8x_tuned)" "long: observation window 16"
    python -m eval.tiny.paired OLD/quality.json qwen_8x_tuned qwen_8x_tuned --b-report NEW/quality.json
    python -m eval.tiny.paired OLD/serve_eval.json qwen_8x_tuned qwen_8x_tuned --b-report NEW/serve_eval.json

(the second form: the same config name in two runs of one suite, e.g. before and after a change).

Prints JSON: each config's accuracy, the difference (b - a), its paired standard error, the
discordant counts and an exact two-sided sign test on them. The gold answers are regenerated
from the report's suite (tasks, lengths, samples, seed), as the report's run drew them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from eval.tiny import quality
from eval.tiny.compare import predictions


def paired(report: dict, a: str, b: str, evaluator: quality.TinyEvaluator | None = None,
           report_b: dict | None = None) -> dict:
    """`a` from `report`, `b` from `report_b` (default: the same report); both must have run
    the same suite."""
    report_b = report if report_b is None else report_b
    if report_b["suite"] != report["suite"]:
        raise ValueError(f"different suites: {report['suite']} vs {report_b['suite']}")
    suite = quality.Suite(**{key: tuple(value) if isinstance(value, list) else value
                             for key, value in report["suite"].items()})
    evaluator = evaluator or quality.TinyEvaluator()
    gold = {f"{task}-{length}-{index}": sample.answer
            for (task, length), samples in evaluator.samples(suite).items()
            for index, sample in enumerate(samples)}
    first, second = predictions(report)[a], predictions(report_b)[b]
    wins = [int(second[key] == answer) - int(first[key] == answer) for key, answer in gold.items()]
    return summary(wins, sum(first[key] == answer for key, answer in gold.items()) / len(gold))


def summary(wins: Sequence[int], accuracy_a: float) -> dict:
    """`wins`: per sample, +1 if only b is right, -1 if only a is, else 0."""
    n = len(wins)
    mean = sum(wins) / n
    se = math.sqrt(sum((w - mean) ** 2 for w in wins) / (n - 1) / n) if n > 1 else float("nan")
    only_a, only_b = wins.count(-1), wins.count(1)
    discordant, fewer = only_a + only_b, min(only_a, only_b)
    p_value = min(1.0, 2 * sum(math.comb(discordant, i) for i in range(fewer + 1)) / 2**discordant) if discordant else 1.0
    return {"samples": n, "accuracy_a": round(accuracy_a, 4), "accuracy_b": round(accuracy_a + mean, 4),
            "difference": round(mean, 4), "paired_se": round(se, 4), "right_only_with_a": only_a,
            "right_only_with_b": only_b, "sign_test_p": round(p_value, 5)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="ablation.json or quality.json")
    parser.add_argument("a", help="config name (the baseline)")
    parser.add_argument("b", help="config name (compared with it)")
    parser.add_argument("--b-report", type=Path, help="take b from this report (same suite) instead")
    args = parser.parse_args(argv)
    report_b = json.loads(args.b_report.read_text()) if args.b_report else None
    print(json.dumps(paired(json.loads(args.report.read_text()), args.a, args.b, report_b=report_b)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
