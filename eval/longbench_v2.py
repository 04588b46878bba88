"""LongBench v2 (503 multiple-choice questions) against an SGLang server.

    python -m eval.longbench_v2 run --data data.json --tokenizer PATH --out-dir OUT [--cot]
    python -m eval.longbench_v2 score OUT/longbench_v2.jsonl [more files ...]

Protocol: /work/shared/research/eval-spec.md, section 2 (official `pred.py`/`result.py`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval import client as client_lib
from eval.client import GenerationParams, OpenAICompatClient, ResultsFile, ServerConfig
from eval.tokens import PromptTokenizer

PROMPT_DIR = Path(__file__).parent / "longbench_v2_prompts"
TEMPLATE_0SHOT = (PROMPT_DIR / "0shot.txt").read_text("utf-8")
TEMPLATE_0SHOT_COT = (PROMPT_DIR / "0shot_cot.txt").read_text("utf-8")
TEMPLATE_0SHOT_COT_ANSWER = (PROMPT_DIR / "0shot_cot_ans.txt").read_text("utf-8")

# config/model2maxlen.json for Qwen2.5-7B-Instruct (served with YaRN x4, 131072 tokens).
DEFAULT_MAX_LENGTH = 120000
DEFAULT_TEMPERATURE = 0.1  # official; not deterministic, pass --temperature 0 for A/B runs
ANSWER_MAX_TOKENS = 128
COT_MAX_TOKENS = 1024
SPLITS = ("Overall", "Easy", "Hard", "Short", "Medium", "Long")
# Item fields kept in the predictions file (upstream also keeps the first 1000 context characters).
RECORD_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "answer")


@dataclass(frozen=True)
class V2RunConfig:
    data_path: Path
    out_dir: Path
    tokenizer_path: str
    cot: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    temperature: float = DEFAULT_TEMPERATURE
    concurrency: int = 8
    limit: int | None = None

    @property
    def output_path(self) -> Path:
        return self.out_dir / ("longbench_v2_cot.jsonl" if self.cot else "longbench_v2.jsonl")


def fill_template(template: str, item: Mapping[str, Any], cot_response: str | None = None) -> str:
    prompt = (
        template.replace("$DOC$", item["context"].strip())
        .replace("$Q$", item["question"].strip())
        .replace("$C_A$", item["choice_A"].strip())
        .replace("$C_B$", item["choice_B"].strip())
        .replace("$C_C$", item["choice_C"].strip())
        .replace("$C_D$", item["choice_D"].strip())
    )
    if cot_response is not None:
        prompt = prompt.replace("$COT$", cot_response)
    return prompt


def extract_answer(response: str) -> str | None:
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match:
        return match.group(1)
    match = re.search(r"The correct answer is ([A-D])", response)
    if match:
        return match.group(1)
    return None


class LongBenchV2Predictor:
    def __init__(self, client: OpenAICompatClient, tokenizer: PromptTokenizer, config: V2RunConfig):
        self.client = client
        self.tokenizer = tokenizer
        self.config = config

    def _query(self, prompt: str, max_tokens: int) -> str:
        prompt = self.tokenizer.truncate_middle_longbench_v2(prompt, self.config.max_length)
        return self.client.chat(prompt, GenerationParams(max_tokens, self.config.temperature))

    def predict(self, item: Mapping[str, Any]) -> dict[str, Any] | None:
        """None (item left out, as upstream does) when the model returns an empty string."""
        record: dict[str, Any] = {key: item[key] for key in RECORD_FIELDS}
        if self.config.cot:
            cot_output = self._query(fill_template(TEMPLATE_0SHOT_COT, item), COT_MAX_TOKENS)
            if cot_output == "":
                return None
            record["response_cot"] = cot_output.strip()
            answer_prompt = fill_template(TEMPLATE_0SHOT_COT_ANSWER, item, cot_response=record["response_cot"])
            output = self._query(answer_prompt, ANSWER_MAX_TOKENS)
        else:
            output = self._query(fill_template(TEMPLATE_0SHOT, item), ANSWER_MAX_TOKENS)
        if output == "":
            return None
        record["response"] = output.strip()
        record["pred"] = extract_answer(record["response"])
        record["judge"] = record["pred"] == item["answer"]
        return record


def load_items(data_path: Path) -> list[dict[str, Any]]:
    with data_path.open(encoding="utf-8") as f:
        return json.load(f)


def run(config: V2RunConfig, server: ServerConfig) -> client_lib.RunSummary:
    tokenizer = PromptTokenizer.from_path(config.tokenizer_path)
    items = load_items(config.data_path)[: config.limit]
    results = ResultsFile(config.output_path, id_field="_id")
    with OpenAICompatClient(server, max_connections=config.concurrency) as client:
        predictor = LongBenchV2Predictor(client, tokenizer, config)
        summary = client_lib.run_pending(items, predictor.predict, results, config.concurrency, "longbench_v2")
    client_lib.log_summary("longbench_v2", summary)
    return summary


def score(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`result.py`: accuracy x100 rounded to 1 decimal per split (None for an empty split).

    Items that failed or returned nothing are absent from `records` and so from every
    denominator, as upstream.
    """
    members = {
        "Overall": list(records),
        "Easy": [r for r in records if r["difficulty"] == "easy"],
        "Hard": [r for r in records if r["difficulty"] != "easy"],
        "Short": [r for r in records if r["length"] == "short"],
        "Medium": [r for r in records if r["length"] == "medium"],
        "Long": [r for r in records if r["length"] == "long"],
    }
    accuracy = {
        split: round(100 * sum(int(r["judge"]) for r in rows) / len(rows), 1) if rows else None
        for split, rows in members.items()
    }
    return {"accuracy": accuracy, "counts": {split: len(rows) for split, rows in members.items()}}


def format_score_table(scores: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["Run\t" + "\t".join(SPLITS)]
    for name, result in scores.items():
        values = ["-" if result["accuracy"][split] is None else str(result["accuracy"][split]) for split in SPLITS]
        lines.append(name + "\t" + "\t".join(values))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.longbench_v2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="generate predictions (resumable)")
    run_parser.add_argument("--data", type=Path, required=True, help="local LongBench-v2 data.json")
    run_parser.add_argument("--tokenizer", required=True, help="local folder of the served model's tokenizer")
    run_parser.add_argument("--out-dir", type=Path, required=True)
    run_parser.add_argument("--cot", action="store_true", help="chain-of-thought, two passes")
    run_parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="prompt token budget")
    run_parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    run_parser.add_argument("--limit", type=int, help="only the first N items")
    client_lib.add_server_arguments(run_parser)

    score_parser = commands.add_parser("score", help="accuracy by Overall/Easy/Hard/Short/Medium/Long")
    score_parser.add_argument("files", type=Path, nargs="+", help="prediction jsonl files")
    score_parser.add_argument("--output", type=Path, help="write the scores as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    client_lib.setup_logging()
    args = build_parser().parse_args(argv)
    if args.command == "run":
        config = V2RunConfig(
            data_path=args.data,
            out_dir=args.out_dir,
            tokenizer_path=args.tokenizer,
            cot=args.cot,
            max_length=args.max_length,
            temperature=args.temperature,
            concurrency=args.concurrency,
            limit=args.limit,
        )
        summary = run(config, client_lib.server_config_from_args(args))
        return 1 if summary.failed else 0
    scores = {str(path): score(client_lib.read_jsonl(path)) for path in args.files}
    print(format_score_table(scores))
    if args.output:
        args.output.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
