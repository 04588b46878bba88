"""LongBench v1 (and LongBench-E) against an SGLang server: predict, score, compare.

    python -m eval.longbench run --data-dir DIR --tokenizer PATH --out-dir OUT [--e]
    python -m eval.longbench score OUT [--e]
    python -m eval.longbench compare BASE_OUT COMPRESSED_OUT

Protocol: /work/shared/research/eval-spec.md, section 1 (official `pred.py`/`eval.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from eval import client as client_lib
from eval.client import GenerationParams, OpenAICompatClient, ResultsFile, ServerConfig
from eval.metrics import sample_score
from eval.tokens import PromptTokenizer

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "longbench_config"
DATASET_TO_PROMPT: dict[str, str] = json.loads((CONFIG_DIR / "dataset2prompt.json").read_text("utf-8"))
DATASET_TO_MAX_NEW_TOKENS: dict[str, int] = json.loads(
    (CONFIG_DIR / "dataset2maxlen.json").read_text("utf-8")
)

# Official order (pred.py).
DATASETS = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa",
    "musique", "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa",
    "samsum", "lsht", "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc",
    "repobench-p",
)
LONGBENCH_E_DATASETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
    "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
# Few-shot and code datasets get no chat template upstream; we send them as raw text.
RAW_COMPLETION_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
EXPECTED_SAMPLES = {name: 200 for name in DATASETS} | {"multifieldqa_en": 150, "lcc": 500, "repobench-p": 500}

# README tables: a category is the mean of its datasets, "Avg" the mean of the six categories.
CATEGORIES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "Single-Doc QA": ("narrativeqa", "qasper", "multifieldqa_en"),
        "Multi-Doc QA": ("hotpotqa", "2wikimqa", "musique"),
        "Summarization": ("gov_report", "qmsum", "multi_news"),
        "Few-shot": ("trec", "triviaqa", "samsum"),
        "Synthetic": ("passage_count", "passage_retrieval_en"),
        "Code": ("lcc", "repobench-p"),
    },
    "zh": {
        "Single-Doc QA": ("multifieldqa_zh",),
        "Multi-Doc QA": ("dureader",),
        "Summarization": ("vcsum",),
        "Few-shot": ("lsht",),
        "Synthetic": ("passage_retrieval_zh",),
        "Code": ("lcc", "repobench-p"),
    },
}
LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")
DEFAULT_MAX_LENGTH = 31500  # 32k window - 500, as config/model2maxlen.json does for 32k models


@dataclass(frozen=True)
class RunConfig:
    data_dir: Path
    out_dir: Path
    tokenizer_path: str
    datasets: tuple[str, ...]
    longbench_e: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    concurrency: int = 8
    limit: int | None = None  # first N records per dataset, for smoke runs


# ---------------------------------------------------------------------------------- prediction


def data_path(data_dir: Path, dataset: str, longbench_e: bool) -> Path:
    return data_dir / (f"{dataset}_e.jsonl" if longbench_e else f"{dataset}.jsonl")


def build_prompt(dataset: str, record: Mapping[str, Any]) -> str:
    return DATASET_TO_PROMPT[dataset].format(**record)


def generation_params(dataset: str, newline_token_id: int) -> GenerationParams:
    """Greedy decoding with the dataset's budget. samsum also stops on the "\\n" token and must
    emit at least one token first (upstream: eos_token_id=[eos, "\\n"], min_length=ctx+1)."""
    max_tokens = DATASET_TO_MAX_NEW_TOKENS[dataset]
    if dataset == "samsum":
        return GenerationParams(max_tokens, 0.0, stop_token_ids=(newline_token_id,), min_tokens=1)
    return GenerationParams(max_tokens, 0.0)


class LongBenchPredictor:
    def __init__(self, client: OpenAICompatClient, tokenizer: PromptTokenizer, max_length: int):
        self.client = client
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.newline_token_id = tokenizer.last_token_id("\n")

    def predict(self, dataset: str, record: Mapping[str, Any]) -> dict[str, Any]:
        prompt = self.tokenizer.truncate_middle_longbench(build_prompt(dataset, record), self.max_length)
        params = generation_params(dataset, self.newline_token_id)
        if dataset in RAW_COMPLETION_DATASETS:
            prediction = self.client.complete(prompt, params)
        else:
            prediction = self.client.chat(prompt, params)
        return {
            "_id": record["_id"],
            "pred": prediction,
            "answers": record["answers"],
            "all_classes": record["all_classes"],
            "length": record["length"],
        }


def run(config: RunConfig, server: ServerConfig) -> dict[str, client_lib.RunSummary]:
    tokenizer = PromptTokenizer.from_path(config.tokenizer_path)
    summaries = {}
    with OpenAICompatClient(server, max_connections=config.concurrency) as client:
        predictor = LongBenchPredictor(client, tokenizer, config.max_length)
        for dataset in config.datasets:
            source = data_path(config.data_dir, dataset, config.longbench_e)
            records = client_lib.read_jsonl(source)
            if not records:
                logger.warning("%s: no data at %s", dataset, source)
                continue
            results = ResultsFile(config.out_dir / f"{dataset}.jsonl", id_field="_id")
            summaries[dataset] = client_lib.run_pending(
                records[: config.limit],
                partial(predictor.predict, dataset),
                results,
                config.concurrency,
                dataset,
            )
            client_lib.log_summary(dataset, summaries[dataset])
    return summaries


# ------------------------------------------------------------------------------------- scoring


def score_records(dataset: str, records: Sequence[Mapping[str, Any]]) -> float:
    """`eval.py` `scorer`: round(100 * mean, 2) of the per-sample scores."""
    total = 0.0
    for record in records:
        total += sample_score(dataset, record["pred"], record["answers"], record["all_classes"])
    return round(100 * total / len(records), 2)


def length_bucket(length: int) -> str:
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def score_records_by_length(dataset: str, records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """`eval.py` `scorer_e`: per length bucket. An empty bucket is None (upstream: NaN)."""
    buckets: dict[str, list[float]] = {bucket: [] for bucket in LENGTH_BUCKETS}
    for record in records:
        score = sample_score(dataset, record["pred"], record["answers"], record["all_classes"])
        buckets[length_bucket(record["length"])].append(score)
    return {
        bucket: round(100 * float(np.mean(scores)), 2) if scores else None
        for bucket, scores in buckets.items()
    }


def summarize(dataset_scores: Mapping[str, float]) -> dict[str, Any]:
    """Category means and their mean ("Avg") for the en and zh tables, over the datasets present.

    A table missing any dataset is marked incomplete: its Avg is then not comparable to
    published numbers.
    """
    summary = {}
    for language, categories in CATEGORIES.items():
        category_means = {}
        missing = []
        for category, members in categories.items():
            present = [dataset_scores[name] for name in members if name in dataset_scores]
            missing += [name for name in members if name not in dataset_scores]
            if present:
                category_means[category] = sum(present) / len(present)
        if not category_means:
            continue
        summary[language] = {
            "categories": {name: round(mean, 2) for name, mean in category_means.items()},
            "avg": round(sum(category_means.values()) / len(category_means), 2),
            "complete": not missing,
            "missing_datasets": missing,
        }
    return summary


def load_predictions(out_dir: Path, dataset: str) -> list[dict[str, Any]]:
    return client_lib.read_jsonl(out_dir / f"{dataset}.jsonl")


def score_dir(out_dir: Path, longbench_e: bool = False) -> dict[str, Any]:
    """Scores of every dataset with predictions in `out_dir`."""
    names = LONGBENCH_E_DATASETS if longbench_e else DATASETS
    predictions = {name: load_predictions(out_dir, name) for name in names}
    predictions = {name: records for name, records in predictions.items() if records}
    result: dict[str, Any] = {"num_samples": {name: len(records) for name, records in predictions.items()}}
    if longbench_e:
        result["datasets"] = {name: score_records_by_length(name, records) for name, records in predictions.items()}
    else:
        result["datasets"] = {name: score_records(name, records) for name, records in predictions.items()}
        result["summary"] = summarize(result["datasets"])
    return result


def format_score_table(result: Mapping[str, Any]) -> str:
    lines = []
    for name, score in result["datasets"].items():
        count = result["num_samples"][name]
        if isinstance(score, dict):  # LongBench-E buckets
            lines.append(f"{name:<22}{json.dumps(score)}  (n={count})")
            continue
        expected = EXPECTED_SAMPLES[name]
        note = "" if count == expected else f"  (n={count} of {expected})"
        lines.append(f"{name:<22}{score:.2f}{note}")
    for language, table in result.get("summary", {}).items():
        categories = ", ".join(f"{name} {value:.2f}" for name, value in table["categories"].items())
        note = "" if table["complete"] else f"  (incomplete, missing: {', '.join(table['missing_datasets'])})"
        lines.append(f"[{language}] Avg {table['avg']:.2f} | {categories}{note}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- compare


def relative_drop(base: float, compressed: float) -> float | None:
    """Percent of the base score lost; None when the base is 0."""
    if base == 0:
        return None
    return round(100 * (base - compressed) / base, 2)


def _common_predictions(base_dir: Path, compressed_dir: Path, dataset: str) -> tuple[list, list]:
    """Predictions of both runs restricted to the ids both have, so partial runs stay comparable."""
    base = {record["_id"]: record for record in load_predictions(base_dir, dataset)}
    compressed = {record["_id"]: record for record in load_predictions(compressed_dir, dataset)}
    common = [item_id for item_id in base if item_id in compressed]
    if len(common) != len(base) or len(common) != len(compressed):
        logger.warning(
            "%s: scoring the %d ids in both runs (base has %d, compressed %d)",
            dataset, len(common), len(base), len(compressed),
        )
    return [base[i] for i in common], [compressed[i] for i in common]


def compare(base_dir: Path, compressed_dir: Path) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for dataset in DATASETS:
        base, compressed = _common_predictions(base_dir, compressed_dir, dataset)
        if base:
            rows[dataset] = {"n": len(base), "base": score_records(dataset, base),
                             "compressed": score_records(dataset, compressed)}
    base_summary = summarize({name: row["base"] for name, row in rows.items()})
    compressed_summary = summarize({name: row["compressed"] for name, row in rows.items()})
    for row in rows.values():
        row["relative_drop_pct"] = relative_drop(row["base"], row["compressed"])
    summary_rows = {}
    for language in base_summary:
        for category, base_score in base_summary[language]["categories"].items():
            compressed_score = compressed_summary[language]["categories"][category]
            summary_rows[f"{category} ({language})"] = _summary_row(base_score, compressed_score)
        average = _summary_row(base_summary[language]["avg"], compressed_summary[language]["avg"])
        summary_rows[f"Avg ({language})"] = average | {"complete": base_summary[language]["complete"]}
    return {"datasets": rows, "summary": summary_rows}


def _summary_row(base: float, compressed: float) -> dict[str, Any]:
    return {"base": base, "compressed": compressed, "relative_drop_pct": relative_drop(base, compressed)}


def format_comparison_markdown(comparison: Mapping[str, Any]) -> str:
    lines = [
        "| Dataset | n | Base | Compressed | Rel. drop (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in comparison["datasets"].items():
        lines.append(f"| {name} | {row['n']} | {row['base']:.2f} | {row['compressed']:.2f} | {_format_drop(row)} |")
    for name, row in comparison["summary"].items():
        label = name if row.get("complete", True) else f"{name}, incomplete"
        lines.append(f"| **{label}** |  | {row['base']:.2f} | {row['compressed']:.2f} | {_format_drop(row)} |")
    return "\n".join(lines) + "\n"


def _format_drop(row: Mapping[str, Any]) -> str:
    drop = row["relative_drop_pct"]
    return "n/a" if drop is None else f"{drop:.2f}"


# ----------------------------------------------------------------------------------------- CLI


def _parse_datasets(value: str | None, longbench_e: bool) -> tuple[str, ...]:
    known = LONGBENCH_E_DATASETS if longbench_e else DATASETS
    if not value:
        return known
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; choose from {', '.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.longbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="generate predictions (resumable)")
    run_parser.add_argument("--data-dir", type=Path, required=True, help="folder of {name}.jsonl / {name}_e.jsonl")
    run_parser.add_argument("--tokenizer", required=True, help="local folder of the served model's tokenizer")
    run_parser.add_argument("--out-dir", type=Path, required=True, help="predictions go to OUT/{dataset}.jsonl")
    run_parser.add_argument("--datasets", help="comma-separated subset (default: all)")
    run_parser.add_argument("--e", action="store_true", help="LongBench-E ({name}_e.jsonl, 13 datasets)")
    run_parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="prompt token budget")
    run_parser.add_argument("--limit", type=int, help="only the first N records of each dataset")
    client_lib.add_server_arguments(run_parser)

    score_parser = commands.add_parser("score", help="score predictions like the official eval.py")
    score_parser.add_argument("out_dir", type=Path)
    score_parser.add_argument("--e", action="store_true", help="LongBench-E length buckets")
    score_parser.add_argument("--output", type=Path, help="JSON path (default: OUT/result.json or result_e.json)")

    compare_parser = commands.add_parser("compare", help="markdown table: baseline vs compressed")
    compare_parser.add_argument("base_dir", type=Path)
    compare_parser.add_argument("compressed_dir", type=Path)
    compare_parser.add_argument("--output", type=Path, help="write the markdown table here too")
    compare_parser.add_argument("--json", type=Path, help="write the comparison as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    client_lib.setup_logging()
    args = build_parser().parse_args(argv)
    if args.command == "run":
        config = RunConfig(
            data_dir=args.data_dir,
            out_dir=args.out_dir,
            tokenizer_path=args.tokenizer,
            datasets=_parse_datasets(args.datasets, args.e),
            longbench_e=args.e,
            max_length=args.max_length,
            concurrency=args.concurrency,
            limit=args.limit,
        )
        summaries = run(config, client_lib.server_config_from_args(args))
        return 1 if any(summary.failed for summary in summaries.values()) else 0
    if args.command == "score":
        result = score_dir(args.out_dir, args.e)
        output = args.output or args.out_dir / ("result_e.json" if args.e else "result.json")
        output.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(format_score_table(result))
        print(f"wrote {output}")
        return 0
    comparison = compare(args.base_dir, args.compressed_dir)
    table = format_comparison_markdown(comparison)
    print(table, end="")
    if args.output:
        args.output.write_text(table, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
