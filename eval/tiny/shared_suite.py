"""The tiny model's shared-context suite: several questions about one document.

    python -m eval.tiny.shared_suite --configs configs/qwen_8x_tuned.yaml ... --task multikey \
        [--contexts 20] [--questions 4] [--length 4096] [--seed 1] [--modes isolated context_first] \
        [--base CONFIG [--only long] [--variants NAME ...]] [--device cpu] [--out DIR]

`--base` adds eval/ablate.py's variants of a config (its groups, default `long`: one knob at
a time at the base's planned ratio), named as there.

`shared_context_groups` builds the documents and questions (SGLang servers run them in
eval/tiny/serve_eval.py). This module's command runs them through the transformers reference
path (`sglang_kvc.hf_reference`), where sweeps are cheap, in two modes:
  * isolated: every question in its own request, document + question compressed together
    (window scoring sees the question);
  * context_first: the document alone is prefilled and compressed first, as when a client
    caches a context before any question arrives (SGLang: a request of the document alone,
    then the questions, which the radix cache serves the compressed document to); every
    question then continues that cache (`hf_reference.answer_after_prefix`).
The server's "shared" mode (the first question's request compresses the document for all)
needs a cache cut back to the document, which the reference path does not do.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.tiny import tasks

SHARED_TASKS = ("kv", "multikey")
MODES = ("isolated", "context_first")
RECORD_LINE = re.compile(r"^([0-9a-f]{4}-[0-9a-f]{4}): (\d{6})$", re.MULTILINE)


@dataclass(frozen=True)
class ContextGroup:
    document_ids: tuple[int, ...]  # header + context, identical in every prompt of the group
    questions: tuple[tuple[tuple[int, ...], str], ...]  # (question + answer prefix ids, answer)


def shared_context_groups(encode, contexts: int, questions: int, length: int, seed: int,
                          task: str = "kv") -> list[ContextGroup]:
    """`contexts` documents, each asked `questions` questions about different needles. Each
    prompt has the length budget of a normal sample of the task: the questions are the same size.
      * kv: a record list (eval/tiny/tasks.py `kv`), asked about records spread over it (the
        sample's own record first). Every record is a needle: nothing in the document says which
        matter before a question names a key, the worst case for a question-independent choice.
      * multikey: `questions` magic-number needles in filler text (tasks.py `multikey` with that
        many keys), each asked once: the RULER-style shared-context suite (eval/shared_context.py)
        at the tiny model's scale, where the needles stand out from the filler."""
    if task not in SHARED_TASKS:
        raise ValueError(f"shared-context task must be one of {SHARED_TASKS}, got {task!r}")
    groups = []
    for index in range(contexts):
        rng = tasks.sample_rng(seed, "shared", task, length, index)
        depth = (index + 0.5) / contexts
        if task == "kv":
            sample = tasks.make_sample("kv", rng, encode, length, depth=depth)
        else:
            sample = tasks.multikey_sample(rng, encode, length, depth=depth, num_keys=questions)
        question_start = sample.prompt.rindex("Question:")
        document = sample.prompt[:question_start]
        document_ids = sample.prompt_ids[: len(sample.prompt_ids) - len(encode(sample.prompt[question_start:]))]
        if task == "kv":
            records = RECORD_LINE.findall(document)
            unique = [(key, value) for key, value in records
                      if document.count(value) == 1 and document.count(key) == 1]
            own = [record for record in unique if record[1] == sample.answer]
            others = [record for record in unique if record[1] != sample.answer]
            step = max(1, len(others) // max(1, questions - 1))
            chosen = own + others[step // 2 :: step][: questions - 1]
            asked = [(tasks.KV_QUESTION.format(key=key), value) for key, value in chosen]
        else:
            own_question = sample.prompt[question_start:].split("\n", 1)[0]
            asked = [(own_question, sample.answer), *sample.follow_ups][:questions]
        groups.append(ContextGroup(tuple(document_ids), tuple(
            (tuple(encode(question + "\n" + tasks.ANSWER_PREFIX)), value) for question, value in asked)))
    return groups


def run_reference(evaluator, name: str, config, groups: Sequence[ContextGroup], modes: Sequence[str],
                  max_new_tokens: int) -> dict:
    """Accuracy per mode of one config (None: the full cache) on the reference path."""
    from sglang_kvc.hf_reference import answer_after_prefix, generate_with_cache, prefill_cache

    def first_line(token_ids: list[int]) -> str:
        return tasks.extract_answer(evaluator.tokenizer.decode(token_ids, skip_special_tokens=True))

    result: dict = {"name": name}
    for mode in modes:
        start, hits, total, predictions = time.perf_counter(), 0, 0, []
        for group in groups:
            cache = prefill_cache(evaluator.model, list(group.document_ids), config) if mode == "context_first" else None
            for question_ids, expected in group.questions:
                if cache is None:
                    generated = generate_with_cache(evaluator.model, list(group.document_ids + question_ids), config,
                                                    max_new_tokens, eos_token_id=evaluator.end_of_answer)
                else:
                    generated = answer_after_prefix(evaluator.model, cache, list(question_ids), max_new_tokens,
                                                    eos_token_id=evaluator.end_of_answer)
                answer = first_line(generated.token_ids)
                hits += answer == expected
                total += 1
                predictions.append(answer)
        result[mode] = {"accuracy": hits / total, "requests": total, "seconds": round(time.perf_counter() - start, 1),
                        "predictions": predictions}
        print(f"{name} {mode}: {hits}/{total}", file=sys.stderr, flush=True)
    return result


def markdown(report: Mapping) -> str:
    modes = report["modes"]
    full = report["results"][0]
    lines = ["| config | " + " | ".join(f"{mode} | rel. to full" for mode in modes) + " |",
             "|---|" + "---:|---:|" * len(modes)]
    for result in report["results"]:
        cells = []
        for mode in modes:
            accuracy, base = result[mode]["accuracy"], full[mode]["accuracy"]
            cells += [f"{accuracy:.3f}", f"{100 * accuracy / base:.1f}%" if base else "-"]
        lines.append(f"| {result['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import datetime
    import shlex

    import torch
    import transformers

    from eval import ablate
    from eval.tiny.quality import MODEL_DIR, TinyEvaluator, load_configs, write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=[], help="compression config YAMLs")
    parser.add_argument("--base", type=Path, help="also run eval/ablate.py's variants of this config")
    parser.add_argument("--only", nargs="+", choices=sorted(ablate.GROUPS), default=["long"],
                        help="with --base: the ablation groups (default: long)")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="with --base: only these variants")
    parser.add_argument("--task", default="multikey", choices=SHARED_TASKS)
    parser.add_argument("--contexts", type=int, default=20)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="folder for shared_suite.json and shared_suite.md")
    args = parser.parse_args(argv)
    if not args.configs and not args.base:
        parser.error("give --configs, --base, or both")
    configs = load_configs(parser, args.configs)
    if args.base:
        configs.update({name: config for name, (_, config) in
                        ablate.chosen_variants(parser, args.base, args.only, args.variants).items()})
    evaluator = TinyEvaluator(args.model, args.device)
    groups = shared_context_groups(evaluator.encode, args.contexts, args.questions, args.length, args.seed, args.task)
    max_new = tasks.MAX_NEW_TOKENS[args.task]
    results = [run_reference(evaluator, "full", None, groups, args.modes, max_new)]
    results += [run_reference(evaluator, name, config, groups, args.modes, max_new) for name, config in configs.items()]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "eval.tiny.shared_suite", *argv]),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "suite": {"task": args.task, "contexts": len(groups), "questions": args.questions, "length": args.length,
                  "seed": args.seed},
        "modes": list(args.modes),
        "results": results,
    }
    table = markdown(report)
    print(table)
    write_report(args.out, "shared_suite", report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
