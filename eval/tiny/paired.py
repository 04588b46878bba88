"""Paired comparison of two configs of one `eval.ablate` / `eval.tiny.quality` /
`eval/tiny/serve_eval.py` report: the same held-out samples, so count the samples only one
of them answers right.

    python -m eval.tiny.paired DIR/ablation.json "long: base (qwen_8x_tuned)" "long: observation window 16"
    python -m eval.tiny.paired OLD/quality.json qwen_8x_tuned qwen_8x_tuned --b-report NEW/quality.json
    python -m eval.tiny.paired OLD/serve_eval.json qwen_8x_tuned qwen_8x_tuned --b-report NEW/serve_eval.json
    python -m eval.tiny.paired SEED1/serve_eval.json bf16 qwen_5x_tuned --pool SEED2/serve_eval.json
    python -m eval.tiny.paired SEED1/old.json bf16 new_config --b-report SEED1/new.json --pool SEED2/old.json,SEED2/new.json

(the second form: the same config name in two runs of one suite, e.g. before and after a change;
the third: both configs in more reports of other suites, e.g. another seed, pooled into one
comparison; the fourth: as the third, with b taken from another report of each suite).

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

from eval.tiny import quality, tasks
from eval.tiny.compare import predictions


def paired(report: dict, a: str, b: str, evaluator: quality.TinyEvaluator | None = None,
           report_b: dict | None = None, pool: Sequence[dict | tuple[dict, dict]] = ()) -> dict:
    """`a` from `report`, `b` from `report_b` (default: the same report); both must have run
    the same suite. `pool`: more suites (another seed: other samples) whose samples join the
    comparison, each a report holding both configs or a pair (report with a, report with b)."""
    evaluator = evaluator or quality.TinyEvaluator()
    wins, right_with_a = _wins(report, a, b, evaluator, report_b)
    suites = [report["suite"]]
    for extra in pool:
        extra_a, extra_b = extra if isinstance(extra, tuple) else (extra, None)
        if extra_a["suite"] in suites:
            raise ValueError(f"suite {extra_a['suite']} pooled twice: its samples would count twice")
        suites.append(extra_a["suite"])
        more_wins, more_right = _wins(extra_a, a, b, evaluator, extra_b)
        wins, right_with_a = wins + more_wins, right_with_a + more_right
    return summary(wins, right_with_a / len(wins))


def _wins(report: dict, a: str, b: str, evaluator: quality.TinyEvaluator,
          report_b: dict | None = None) -> tuple[list[int], int]:
    """Per sample +1 / -1 / 0 (see `summary`), and how many samples `a` answers right."""
    report_b = report if report_b is None else report_b
    if report_b["suite"] != report["suite"]:
        raise ValueError(f"different suites: {report['suite']} vs {report_b['suite']}")
    gold = {key: sample.answer for key, sample in held_out_samples(report, evaluator).items()}
    first, second = predictions(report)[a], predictions(report_b)[b]
    wins = [int(second[key] == answer) - int(first[key] == answer) for key, answer in gold.items()]
    return wins, sum(first[key] == answer for key, answer in gold.items())


def held_out_samples(report: dict, evaluator: quality.TinyEvaluator) -> dict[str, tasks.Sample]:
    """{sample id: sample} of the suite a report ran, regenerated as the report's run drew them
    (ids as in its predictions: task-length-index)."""
    suite = quality.Suite(**{key: tuple(value) if isinstance(value, list) else value
                             for key, value in report["suite"].items()})
    return {tasks.sample_id(task, length, index): sample
            for (task, length), samples in evaluator.samples(suite).items()
            for index, sample in enumerate(samples)}


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


def _pooled_suite(item: str) -> dict | tuple[dict, dict]:
    paths = item.split(",")
    if len(paths) > 2:
        raise SystemExit(f"--pool {item}: expected REPORT or REPORT,B_REPORT")
    reports = [json.loads(Path(path).read_text()) for path in paths]
    return reports[0] if len(reports) == 1 else (reports[0], reports[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="ablation.json or quality.json")
    parser.add_argument("a", help="config name (the baseline)")
    parser.add_argument("b", help="config name (compared with it)")
    parser.add_argument("--b-report", type=Path, help="take b from this report (same suite) instead")
    parser.add_argument("--pool", nargs="+", default=[], metavar="REPORT[,B_REPORT]",
                        help="more suites (e.g. seeds), pooled in: a report with both configs, "
                             "or a report with a and one with b, comma-separated")
    args = parser.parse_args(argv)
    report_b = json.loads(args.b_report.read_text()) if args.b_report else None
    pool = [_pooled_suite(item) for item in args.pool]
    print(json.dumps(paired(json.loads(args.report.read_text()), args.a, args.b, report_b=report_b, pool=pool)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
