"""Answer-by-answer agreement between runs of the tiny suite on the same samples.

    python -m eval.tiny.compare HF_QUALITY.json SERVE_EVAL.json [SERVE_EVAL.json ...]

Reads eval/tiny/quality.py output (transformers reference path: `predictions[config][id]`)
and eval/tiny/serve_eval.py output (`servers[i].suite.predictions[id]`); prints, per config
name found in both (a server named `NAME+torch` or `NAME+triton` is matched to NAME), the share of samples
whose first answer lines are identical, and the same between every server pair of one config
(e.g. the torch and the Triton attention path). A served ablation's ablation.json (`eval.ablate
--server`) reads as a reference report keyed by variant. Sample ids are `task-length-index`
and a sample is drawn from its seed and id alone (`tasks.sample_rng`), so runs of one seed
compare on the ids they share: a reference run may take a subset of a server run's tasks,
lengths and samples. The seeds must match (checked).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path


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
        servers.update(predictions(serve))
    return predictions(hf), servers


def compare(hf_predictions: Mapping[str, Mapping[str, str]], servers: Mapping[str, Mapping[str, str]]) -> list[dict]:
    rows = []
    for server_name, predictions in servers.items():
        config = "full" if server_name == "bf16" else server_name.split("+")[0]
        if config in hf_predictions:
            share, count = agreement(hf_predictions[config], predictions)
            rows.append({"left": f"transformers {config}", "right": f"server {server_name}", "agreement": share,
                         "samples": count})
    names = sorted(servers)
    for i, left in enumerate(names):
        for right in names[i + 1:]:
            if left.split("+")[0] == right.split("+")[0]:
                share, count = agreement(servers[left], servers[right])
                rows.append({"left": f"server {left}", "right": f"server {right}", "agreement": share,
                             "samples": count})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_quality", type=Path)
    parser.add_argument("serve_eval", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    rows = compare(*load_runs(args.hf_quality, args.serve_eval))
    print("| run | run | identical answers | samples |\n|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['left']} | {row['right']} | {100 * row['agreement']:.1f}% | {row['samples']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
