"""Answer-by-answer agreement between runs of the tiny suite on the same samples.

    python -m eval.tiny.compare HF_QUALITY.json SERVE_EVAL.json [SERVE_EVAL.json ...] [--right-answers]

Reads eval/tiny/quality.py output (transformers reference path: `predictions[config][id]`)
and eval/tiny/serve_eval.py output (`servers[i].suite.predictions[id]`); prints, per config
name found in both (a server named `NAME+torch` or `NAME+triton` is matched to NAME), the share of samples
whose first answer lines are identical, and the same between every server pair of one config
(e.g. the torch and the Triton attention path). A served ablation's ablation.json (`eval.ablate
--server`) reads as a reference report keyed by variant. Sample ids are `task-length-index`
and a sample is drawn from its seed, its id and the suite's samples per cell (the needle of
sample `i` sits at depth `(i + 0.5) / samples`, `tasks.eval_samples`), so runs of one seed and
one sample count compare on the ids they share: a reference run may take a subset of a server
run's tasks and lengths. The seeds and sample counts must match (checked: until 2026-12-01 only
the seed was, and a 50-sample run was compared with a 100-sample one whose same ids are other
prompts). `--right-answers` also counts each run's
right answers (the samples regenerated from the reference run's suite) and how often the two
agree on right against wrong: two runs may give different wrong answers to one sample.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from eval.tiny import tasks


def agreement(left: Mapping[str, str], right: Mapping[str, str]) -> tuple[float, int]:
    common = sorted(set(left) & set(right))
    if not common:
        return float("nan"), 0
    return sum(left[i] == right[i] for i in common) / len(common), len(common)


def predictions(report: dict) -> dict[str, dict[str, str]]:
    """{config: {sample id: answer}} of a transformers-path report (`predictions`) or of a
    server report (`servers[i].suite.predictions`, keyed by server name; a server that
    failed has no suite and is skipped)."""
    if "predictions" in report:
        return report["predictions"]
    return {server["name"]: server["suite"]["predictions"] for server in report["servers"] if server.get("suite")}


def load_runs(hf_path: Path, serve_paths: Sequence[Path]) -> tuple[dict, dict]:
    hf = json.loads(hf_path.read_text())
    servers: dict[str, dict[str, str]] = {}
    for path in serve_paths:
        serve = json.loads(path.read_text())
        if serve["suite"]["seed"] != hf["suite"]["seed"]:
            raise SystemExit(f"{path}: seed {serve['suite']['seed']} differs from {hf_path}'s "
                             f"{hf['suite']['seed']}: no sample is the same")
        if serve["suite"]["samples"] != hf["suite"]["samples"]:
            raise SystemExit(f"{path}: {serve['suite']['samples']} samples per cell, {hf_path}: "
                             f"{hf['suite']['samples']}: the needle depth of a sample depends on the count, "
                             "so the same id names different prompts")
        servers.update(predictions(serve))
    return predictions(hf), servers


def right_answers(left: Mapping[str, str], right: Mapping[str, str], gold: Mapping[str, str]) -> dict:
    """On the samples both runs answered: how many each got right, and the share where both were
    right or both wrong (two runs may disagree on a wrong answer and still agree that it is wrong)."""
    common = sorted(set(left) & set(right) & set(gold))
    left_right = [left[i] == gold[i] for i in common]
    right_right = [right[i] == gold[i] for i in common]
    by_cell: dict[str, list[int]] = {}  # "task-length" -> [right on the left, right on the right, samples]
    for sample_id, left_ok, right_ok in zip(common, left_right, right_right):
        counts = by_cell.setdefault(tasks.cell_and_index(sample_id)[0], [0, 0, 0])
        counts[0] += left_ok
        counts[1] += right_ok
        counts[2] += 1
    return {"right_left": sum(left_right), "right_right": sum(right_right),
            "same_correctness": sum(a == b for a, b in zip(left_right, right_right)) / len(common) if common
            else float("nan"), "right_by_cell": by_cell}


def compare(hf_predictions: Mapping[str, Mapping[str, str]], servers: Mapping[str, Mapping[str, str]],
            gold: Mapping[str, str] | None = None, same: Mapping[str, str] | None = None) -> list[dict]:
    """Rows of (left run, right run, identical answers, samples); with `gold` (sample id -> the
    right answer) also `right_answers`. `same`: server config name -> the reference run's name
    for it, where the two runs named one config differently (e.g. an ablation's "hybrid (base)")."""
    pairs = []
    for server_name, predictions in servers.items():
        config = "full" if server_name == "bf16" else server_name.split("+")[0]
        config = (same or {}).get(config, config)
        if config in hf_predictions:
            pairs.append((f"transformers {config}", hf_predictions[config], f"server {server_name}", predictions))
    names = sorted(servers)
    for i, left in enumerate(names):
        for right in names[i + 1:]:
            if left.split("+")[0] == right.split("+")[0]:
                pairs.append((f"server {left}", servers[left], f"server {right}", servers[right]))
    rows = []
    for left_name, left, right_name, right in pairs:
        share, count = agreement(left, right)
        row = {"left": left_name, "right": right_name, "agreement": share, "samples": count}
        rows.append(row | (right_answers(left, right, gold) if gold is not None else {}))
    return rows


def gold_answers(report: dict, model: Path) -> dict[str, str]:
    """Sample id -> right answer, for the suite a report ran (regenerated from its seed)."""
    from eval.tiny import paired, quality

    evaluator = quality.TinyEvaluator(model)
    return {key: sample.answer for key, sample in paired.held_out_samples(report, evaluator).items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_quality", type=Path)
    parser.add_argument("serve_eval", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--right-answers", action="store_true",
                        help="also count right answers per run (the samples regenerated with --model's tokenizer)")
    parser.add_argument("--model", type=Path, help="model folder for --right-answers (default: the bundled one)")
    parser.add_argument("--same", nargs="+", default=[], metavar="SERVER_NAME=REFERENCE_NAME",
                        help="a config the two runs name differently, e.g. 'qwen_12x_tuned=hybrid (base)'")
    args = parser.parse_args(argv)
    same = dict(pair.split("=", 1) for pair in args.same if "=" in pair)
    if len(same) != len(args.same):
        parser.error(f"--same takes SERVER_NAME=REFERENCE_NAME pairs, got {args.same}")
    reference, servers = load_runs(args.hf_quality, args.serve_eval)
    gold = None
    if args.right_answers:
        from eval.tiny.quality import MODEL_DIR

        gold = gold_answers(json.loads(args.hf_quality.read_text()), args.model or MODEL_DIR)
    rows = compare(reference, servers, gold, same)
    if gold is None:
        print("| run | run | identical answers | samples |\n|---|---|---:|---:|")
    else:
        print("| run | run | identical answers | right (left / right) | both right or both wrong | samples |\n"
              "|---|---|---:|---:|---:|---:|")
    for row in rows:
        extra = ("" if gold is None else
                 f" {row['right_left']} / {row['right_right']} | {100 * row['same_correctness']:.1f}% |")
        print(f"| {row['left']} | {row['right']} | {100 * row['agreement']:.1f}% |{extra} {row['samples']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
