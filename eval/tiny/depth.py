"""Accuracy by needle depth: where in the context the needles a config loses were.

    python -m eval.tiny.depth REPORT.json [--bins 4] [--cells kv-8192 vt-1024] [--json OUT.json]

REPORT: an `eval.tiny.quality` report (transformers reference path) or an
`eval/tiny/serve_eval.py` report. Held-out sample `i` of a cell of `n` samples has its needle
at depth (i + 0.5) / n (`tasks.needle_depth`), so a cell's samples split into `--bins` equal
depth ranges (0: the context's start). Prints, per config and cell, the right answers in each
range; the gold answers are regenerated from the report's suite, as `eval.tiny.compare` does.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from eval.tiny import tasks
from eval.tiny.compare import gold_answers, predictions
from eval.tiny.quality import MODEL_DIR


def right_by_depth(answers: Mapping[str, str], gold: Mapping[str, str], samples: int, bins: int) -> dict:
    """{cell: [[right, samples] per depth bin]} over the ids of `answers` (`task-length-index`)."""
    by_cell: dict[str, list[list[int]]] = {}
    for sample_id, answer in answers.items():
        cell, index = tasks.cell_and_index(sample_id)
        depth = tasks.needle_depth(index, samples)
        counts = by_cell.setdefault(cell, [[0, 0] for _ in range(bins)])[min(int(depth * bins), bins - 1)]
        counts[0] += answer == gold[sample_id]
        counts[1] += 1
    return dict(sorted(by_cell.items()))


def markdown(table: Mapping[str, Mapping[str, list[list[int]]]], bins: int) -> str:
    edges = [f"{100 * b // bins}-{100 * (b + 1) // bins}%" for b in range(bins)]
    lines = ["| config | cell | " + " | ".join(f"needle at {edge}" for edge in edges) + " |",
             "|---|---|" + "---:|" * bins]
    for config, cells in table.items():
        for cell, counts in cells.items():
            lines.append(f"| {config} | {cell} | " + " | ".join(f"{right} / {total}" for right, total in counts) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--bins", type=int, default=4)
    parser.add_argument("--cells", nargs="+", help="only these cells (task-length), e.g. kv-8192")
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="for the tokenizer that regenerates the samples")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.bins < 1:
        parser.error(f"--bins: at least 1, got {args.bins}")
    report = json.loads(args.report.read_text())
    gold = gold_answers(report, args.model)
    samples = report["suite"]["samples"]
    table = {}
    for config, answers in predictions(report).items():
        if args.cells:
            answers = {key: value for key, value in answers.items() if tasks.cell_and_index(key)[0] in args.cells}
        table[config] = right_by_depth(answers, gold, samples, args.bins)
    print(markdown(table, args.bins))
    if args.json:
        args.json.write_text(json.dumps({"report": str(args.report), "suite": report["suite"], "bins": args.bins,
                                         "right_by_depth": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
