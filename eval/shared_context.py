"""Shared-context suite: several questions about one long context, sent as separate requests.

    python -m eval.shared_context generate --tokenizer PATH --out DATA.jsonl [--length 32768]
    python -m eval.shared_context run --data DATA.jsonl --out-dir OUT --mode shared|isolated|context_first [--flush-cache]
    python -m eval.shared_context score OUT

Each context is a RULER-style essay haystack holding one needle per question. Every prompt is
`document + question + answer_prefix`, where `document` (instruction + context) is identical
for all questions of a context:

- shared: prompts are sent as they are. SGLang's radix cache matches the document prefix, so
  every question after the first one reuses the KV cache (compressed, with sglang-kvc) that the
  first request built. The first question of each context is sent, and finished, before the
  others so that they find it cached instead of racing it.
- isolated: every prompt starts with a fresh random nonce line, so no prefix is ever shared
  and every request prefills (and compresses) the context itself.
- context_first: each document is sent alone first (one token asked), as a client caching a
  context before any question arrives, so it is compressed with no question in view; then
  every question, each finding the document in the radix cache.

Comparing each reusing mode with isolated measures the cost of reusing a compressed prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from random import Random
from typing import Any

from eval import client as client_lib
from eval import ruler
from eval.client import GenerationParams, OpenAICompatClient, ResultsFile, ServerConfig
from eval.tokens import PromptTokenizer

MODES = ("shared", "isolated", "context_first")
TOKENS_TO_GENERATE = 128  # RULER's NIAH budget


@dataclass(frozen=True)
class GenerateConfig:
    tokenizer_path: str
    out_path: Path
    max_seq_length: int = 32768
    num_contexts: int = 25
    num_questions: int = 4
    seed: int = 42


def context_task(num_questions: int) -> ruler.NiahTask:
    """Essay haystack, word keys, one 7-digit number per key: one needle per question."""
    return ruler.NiahTask("essay", "words", "numbers", num_keys=num_questions,
                          tokens_to_generate=TOKENS_TO_GENERATE)


def build_context(task: ruler.NiahTask, rng: Random, size: int) -> dict[str, Any]:
    haystack = ruler.build_niah_haystack(task, rng, size)
    document = None
    questions = []
    for key, values in zip(haystack.keys, haystack.values):
        prompt, answer_prefix = ruler.niah_prompt(task, haystack.context, [key])
        end_of_document = prompt.index(haystack.context) + len(haystack.context) + len("\n")
        if document is None:
            document = prompt[:end_of_document]
        if prompt[:end_of_document] != document:
            raise ValueError("the questions of a context must share the document prefix")
        questions.append({"key": key, "question": prompt[end_of_document:], "answer_prefix": answer_prefix,
                          "outputs": values})
    return {"document": document, "questions": questions}


def longest_prompt_tokens(tokenizer: PromptTokenizer, context: Mapping[str, Any]) -> int:
    return max(
        tokenizer.count(context["document"] + question["question"] + question["answer_prefix"])
        for question in context["questions"]
    )


def generate_contexts(config: GenerateConfig, tokenizer: PromptTokenizer) -> list[dict[str, Any]]:
    task = context_task(config.num_questions)

    def build(index: int, size: int) -> tuple[dict[str, Any], int]:
        rng = ruler.sample_rng(config.seed, "shared_context", config.max_seq_length, index)
        context = build_context(task, rng, size)
        return context, longest_prompt_tokens(tokenizer, context) + TOKENS_TO_GENERATE

    fitted = ruler.fit_samples(build, config.num_contexts, config.max_seq_length, minimum_size=0)
    return [
        {"context_id": f"ctx-{index}", "max_seq_length": config.max_seq_length, "length": item.length,
         **item.sample}
        for index, item in enumerate(fitted)
    ]


# ------------------------------------------------------------------------------------------ run


def expand_requests(contexts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One request per question; the prompt of each is document + question + answer prefix."""
    return [
        {
            "id": f"{context['context_id']}-q{index}",
            "context_id": context["context_id"],
            "question_index": index,
            "key": question["key"],
            "prompt": context["document"] + question["question"] + question["answer_prefix"],
            "outputs": question["outputs"],
        }
        for context in contexts
        for index, question in enumerate(context["questions"])
    ]


def isolating_prefix() -> str:
    """A line no other request starts with: the radix cache matches prefixes from the first
    token on, so nothing after it can be reused."""
    return f"Request {uuid.uuid4().hex}.\n\n"


def predict(client: OpenAICompatClient, mode: str, request: Mapping[str, Any]) -> dict[str, Any]:
    prefix = isolating_prefix() if mode == "isolated" else ""
    prediction = client.complete(prefix + request["prompt"], GenerationParams(TOKENS_TO_GENERATE, 0.0))
    record = {key: request[key] for key in ("id", "context_id", "question_index", "key", "outputs")}
    return record | {"mode": mode, "isolating_prefix": prefix, "pred": prediction}


def results_path(out_dir: Path, mode: str) -> Path:
    return out_dir / f"shared_context_{mode}.jsonl"


def send_documents(client: OpenAICompatClient, documents: Sequence[str], concurrency: int) -> None:
    """Each document alone, for one token, so that the radix cache holds it (compressed with
    no question in view) before its questions arrive."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda document: client.complete(document, GenerationParams(1, 0.0)), documents))


def run(data_path: Path, out_dir: Path, mode: str, server: ServerConfig, concurrency: int,
        flush_cache: bool = False) -> list[client_lib.RunSummary]:
    contexts = client_lib.read_jsonl(data_path)
    requests = expand_requests(contexts)
    results = ResultsFile(results_path(out_dir, mode), id_field="id")
    with OpenAICompatClient(server, max_connections=concurrency) as client:
        if flush_cache:
            client.flush_cache()
        worker = partial(predict, client, mode)
        if mode == "context_first":
            # Only the documents whose questions are still to run (a resumed run sends those again).
            done = results.done_ids()
            waiting = {r["context_id"] for r in requests if str(r["id"]) not in done}
            send_documents(client, [c["document"] for c in contexts if c["context_id"] in waiting], concurrency)
        if mode == "shared":
            first_questions = [r for r in requests if r["question_index"] == 0]
            follow_ups = [r for r in requests if r["question_index"] > 0]
            waves = [first_questions, follow_ups]
        else:
            waves = [requests]
        summaries = [
            client_lib.run_pending(wave, worker, results, concurrency, f"{mode} {number + 1}/{len(waves)}")
            for number, wave in enumerate(waves)
        ]
    for summary in summaries:
        client_lib.log_summary(mode, summary)
    return summaries


# ---------------------------------------------------------------------------------------- score


def accuracy(records: Sequence[Mapping[str, Any]]) -> float | None:
    if not records:
        return None
    predictions = [ruler.postprocess_prediction(record["pred"]) for record in records]
    return ruler.string_match_all(predictions, [record["outputs"] for record in records])


def score_dir(out_dir: Path) -> dict[str, Any]:
    """Accuracy per mode, split into the first question of each context (which builds the
    cached prefix) and the follow-up questions (which reuse it in shared mode)."""
    result: dict[str, Any] = {}
    for mode in MODES:
        records = client_lib.read_jsonl(results_path(out_dir, mode))
        if records:
            result[mode] = {
                "accuracy": accuracy(records),
                "first_question": accuracy([r for r in records if r["question_index"] == 0]),
                "follow_up_questions": accuracy([r for r in records if r["question_index"] > 0]),
                "num_requests": len(records),
            }
    for mode in ("shared", "context_first"):
        if mode in result and "isolated" in result:
            result[f"{mode}_minus_isolated"] = round(result[mode]["accuracy"] - result["isolated"]["accuracy"], 2)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.shared_context", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    generate_parser = commands.add_parser("generate", help="write the contexts and their questions")
    generate_parser.add_argument("--tokenizer", required=True, help="local folder of the served model's tokenizer")
    generate_parser.add_argument("--out", type=Path, required=True, help="jsonl, one context per line")
    generate_parser.add_argument("--length", type=int, default=32768, help="max_seq_length of the longest prompt")
    generate_parser.add_argument("--num-contexts", type=int, default=25)
    generate_parser.add_argument("--num-questions", type=int, default=4, help="questions (needles) per context")
    generate_parser.add_argument("--seed", type=int, default=42)

    run_parser = commands.add_parser("run", help="send the questions (resumable)")
    run_parser.add_argument("--data", type=Path, required=True)
    run_parser.add_argument("--out-dir", type=Path, required=True)
    run_parser.add_argument("--mode", choices=MODES, required=True)
    run_parser.add_argument("--flush-cache", action="store_true", help="POST /flush_cache first (SGLang)")
    client_lib.add_server_arguments(run_parser)

    score_parser = commands.add_parser("score", help="accuracy per mode")
    score_parser.add_argument("out_dir", type=Path)
    score_parser.add_argument("--output", type=Path, help="JSON path (default: OUT/result.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    client_lib.setup_logging()
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        config = GenerateConfig(args.tokenizer, args.out, args.length, args.num_contexts, args.num_questions, args.seed)
        client_lib.write_jsonl(config.out_path, generate_contexts(config, PromptTokenizer.from_path(args.tokenizer)))
        print(config.out_path)
        return 0
    if args.command == "run":
        summaries = run(args.data, args.out_dir, args.mode, client_lib.server_config_from_args(args),
                        args.concurrency, args.flush_cache)
        return 1 if any(summary.failed for summary in summaries) else 0
    result = score_dir(args.out_dir)
    output = args.output or args.out_dir / "result.json"
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
