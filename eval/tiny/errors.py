"""What a tiny model's wrong answers are: held-out samples of one task and length, greedy with a
full cache (as training's final evaluation), each wrong answer put in one class:

  * `another question's answer`: the answer to another question about the same context (a
    distractor needle, key or chain: `Sample.follow_ups`), i.e. the model retrieved the wrong
    item, not a garbled one;
  * `partial`: a strict prefix of the answer (a variable chain cut short);
  * `mixed`: shares words with the answer but is neither (chains spliced together);
  * `other`.

    python -m eval.tiny.errors --model eval/tiny/model --task vt --length 1024 --samples 32 [--out errors.json]

The samples are the training script's held-out set (`tasks.eval_samples`, seed 0): the first
`--samples` of its cells when `--samples` equals `--eval-samples` there.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from eval.tiny import model as tiny_model
from eval.tiny import tasks
from eval.tiny import tokenizer as tiny_tokenizer
from eval.tiny.train import greedy_generate

ERROR_KINDS = ("another question's answer", "partial", "mixed", "other")


def classify(sample: tasks.Sample, answer: str) -> str | None:
    """None when `answer` is right, else its class (ERROR_KINDS)."""
    if answer == sample.answer:
        return None
    if answer in {other for _, other in sample.follow_ups}:
        return ERROR_KINDS[0]
    wanted, given = sample.answer.split(), answer.split()
    if given and wanted[: len(given)] == given:
        return ERROR_KINDS[1]
    if set(wanted) & set(given):
        return ERROR_KINDS[2]
    return ERROR_KINDS[3]


def wrong_answers(model_dir: Path, task: str, length: int, samples: int, seed: int = 0,
                  batch: int = 8) -> dict:
    model = tiny_model.load_model(model_dir).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    encode = tasks.TokenizerPieceEncoder(tokenizer)
    held_out = tasks.eval_samples(encode, [task], [length], samples, seed)[(task, length)]
    eos_ids = [tokenizer.token_to_id(tiny_tokenizer.EOS_TOKEN), tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN)]
    pad_id = tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN)
    wrong = []
    with torch.no_grad():
        for start in range(0, len(held_out), batch):
            chunk = held_out[start : start + batch]
            outputs = greedy_generate(model, [s.prompt_ids for s in chunk], tasks.MAX_NEW_TOKENS[task], eos_ids, pad_id)
            for index, (ids, sample) in enumerate(zip(outputs, chunk), start=start):
                answer = tasks.extract_answer(tokenizer.decode(ids))
                kind = classify(sample, answer)
                if kind is not None:
                    wrong.append({"index": index, "depth": sample.depth, "expected": sample.answer, "answer": answer,
                                  "kind": kind})
    return {"model": str(model_dir), "task": task, "length": length, "samples": len(held_out), "seed": seed,
            "correct": len(held_out) - len(wrong), "kinds": dict(Counter(w["kind"] for w in wrong)), "wrong": wrong}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a saved tiny model folder")
    parser.add_argument("--task", choices=tasks.TASK_NAMES, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args(argv)
    report = wrong_answers(args.model, args.task, args.length, args.samples, args.seed)
    for entry in report["wrong"]:
        print(f"#{entry['index']} ({entry['kind']}): expected {entry['expected']!r}, answered {entry['answer']!r}")
    print(json.dumps({key: report[key] for key in ("task", "length", "samples", "correct", "kinds")}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
