"""Why a compressed config loses the held-out samples it loses: eviction or quantization.

    python -m eval.tiny.attribute REPORT.json BASELINE CONFIG.yaml [--pool MORE.json ...] [--out F.json]
    python -m eval.tiny.attribute REPORT.json BASELINE CONFIG.yaml --baseline-from OTHER.json

REPORT is a `serve_eval.py` (server) or `eval.tiny.quality` (reference path) report holding
both BASELINE (e.g. `bf16` or `full`) and the config (by its `name`), or the config alone with
BASELINE taken from another report of the same suite (`--baseline-from`). Each held-out sample the
baseline answers right and the config wrong is answered again on the transformers reference
path (`sglang_kvc.hf_reference`, CPU), with the config and with diagnostic variants of it that
remove one cause at a time (their KV bytes differ: they are probes, not candidates):

  * `as configured`: does the reference path reproduce the failure?
  * `kept tokens in bf16`: the same tokens kept, none quantized (every kept token guarded at
    16 bits). Right here: the failure needs quantization.
  * `every token kept`: nothing evicted, the config's quantization. Right here: it needs eviction.
  * `8-bit keys`, `4-bit values`: the same tokens kept, one of K / V at more bits.

A failure fixed by `kept tokens in bf16` alone is put down to quantization, by `every token
kept` alone to eviction, by both to `either`, by neither to `both`. Prints a table and
optionally writes JSON (every sample's answers and class).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from eval.ablate import variant
from eval.tiny import quality, tasks
from eval.tiny.compare import predictions
from eval.tiny.paired import held_out_samples
from sglang_kvc.config import CompressionConfig, load_config

CAUSES = ("not reproduced", "quantization", "eviction", "either", "both")


def probes(config: CompressionConfig) -> dict[str, CompressionConfig]:
    """The config and its diagnostic variants, by name (see the module docstring)."""
    return {
        "as configured": config,
        "kept tokens in bf16": variant(config, f"{config.name} kept in bf16",
                                       quantization={"guard_fraction": 1.0, "guard_bits": 16}),
        "every token kept": variant(config, f"{config.name} every token kept",
                                    sparsity={"retain_ratio": 1.0, "budget": "uniform"}),
        "8-bit keys": variant(config, f"{config.name} 8-bit keys", quantization={"key_bits": 8}),
        "4-bit values": variant(config, f"{config.name} 4-bit values", quantization={"value_bits": 4}),
    }


def cause(right: dict[str, bool]) -> str:
    """The class of one lost sample from which probes answer it right."""
    if right["as configured"]:
        return "not reproduced"
    unquantized, unevicted = right["kept tokens in bf16"], right["every token kept"]
    if unquantized and unevicted:
        return "either"
    return "quantization" if unquantized else "eviction" if unevicted else "both"


def lost_samples(report: dict, baseline: str, name: str, evaluator: quality.TinyEvaluator,
                 cells: Sequence[str] | None = None) -> list:
    """(sample id, sample, the config's answer in the report) for every sample the baseline
    answers right and the config wrong (only in `cells`, e.g. ["kv-8192"], if given)."""
    answers = predictions(report)
    return [(key, sample, answers[name][key]) for key, sample in held_out_samples(report, evaluator).items()
            if answers[baseline][key] == sample.answer and answers[name][key] != sample.answer
            and (cells is None or tasks.cell_and_index(key)[0] in cells)]


def with_baseline_from(report: dict, other: dict, baseline: str) -> dict:
    """`report` with `baseline`'s answers taken from `other`, a report of the same suite."""
    if other["suite"] != report["suite"]:
        raise ValueError(f"different suites: {report['suite']} vs {other['suite']}")
    return {"suite": report["suite"], "predictions": {**predictions(report), baseline: predictions(other)[baseline]}}


def attribute(reports: Sequence[dict], baseline: str, config: CompressionConfig,
              evaluator: quality.TinyEvaluator | None = None, name: str | None = None,
              cells: Sequence[str] | None = None) -> dict:
    """Every sample of `reports` (of `cells` only, if given) that `baseline` answers right and
    the config (entry `name`, default its own name) wrong, answered by each probe on the
    reference path: per sample its answers, needle depth and cause, and the counts."""
    evaluator = evaluator or quality.TinyEvaluator()
    name = name or config.name
    configs = probes(config)
    rows = []
    for report in reports:
        for key, sample, reported in lost_samples(report, baseline, name, evaluator, cells):
            answers = {probe: evaluator.answer(sample, probe_config)[0] for probe, probe_config in configs.items()}
            right = {probe: answer == sample.answer for probe, answer in answers.items()}
            rows.append({"id": key, "suite": report["suite"], "task": sample.task, "length": sample.length,
                         "depth": sample.depth, "expected": sample.answer, "reported": reported,
                         "answers": answers, "cause": cause(right)})
    reproduced = [row for row in rows if row["cause"] != "not reproduced"]
    return {
        "baseline": baseline, "config": name, "lost": len(rows), "reproduced": len(reproduced),
        "causes": {c: sum(row["cause"] == c for row in rows) for c in CAUSES},
        # Of the reproduced losses, how many each probe answers right.
        "fixed_by": {probe: sum(row["answers"][probe] == row["expected"] for row in reproduced)
                     for probe in configs if probe != "as configured"},
        "by_task_length": {f"{task} {length}": count for (task, length), count in
                           sorted(Counter((row["task"], row["length"]) for row in rows).items())},
        "samples": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"{result['lost']} samples right with `{result['baseline']}` and wrong with `{result['config']}`, "
             f"{result['reproduced']} of them wrong on the reference path too",
             "", "| probe | of those, right |", "|---|---:|"]
    lines += [f"| {probe} | {count} |" for probe, count in result["fixed_by"].items()]
    lines += ["", "| cause | samples |", "|---|---:|"]
    lines += [f"| {c} | {count} |" for c, count in result["causes"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a serve_eval.py or eval.tiny.quality report")
    parser.add_argument("baseline", help="the full-cache entry of the report (bf16 on a server, full on the reference path)")
    parser.add_argument("config", type=Path, help="the compressed config's YAML (its name is its entry in the report)")
    parser.add_argument("--name", help="the config's entry in the report, if not its YAML name")
    parser.add_argument("--pool", type=Path, nargs="+", default=[], help="more reports (other suites) with both")
    parser.add_argument("--baseline-from", type=Path,
                        help="take BASELINE's answers from this report of REPORT's suite (not with --pool)")
    parser.add_argument("--cells", nargs="+", help="only samples of these cells (task-length), e.g. kv-8192")
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.baseline_from and args.pool:
        parser.error("--baseline-from takes one report, without --pool")
    reports = [json.loads(path.read_text()) for path in (args.report, *args.pool)]
    if args.baseline_from:
        reports = [with_baseline_from(reports[0], json.loads(args.baseline_from.read_text()), args.baseline)]
    result = attribute(reports, args.baseline, load_config(args.config), name=args.name, cells=args.cells)
    result["command"] = "python -m eval.tiny.attribute " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
