"""RULER-style synthetic suite, generated offline from a seed.

    python -m eval.ruler generate --tokenizer PATH --out-dir DATA [--lengths 4096,8192] [--num-samples 500]
    python -m eval.ruler run --data-dir DATA --out-dir PREDS
    python -m eval.ruler score PREDS

Tasks, templates, answer prefixes, token budgets and scoring follow NVIDIA/RULER (see
/work/shared/research/eval-spec.md, section 3). The haystacks use only text shipped here: RULER's
noise sentence, our own essay paragraphs (eval/ruler_data/essay.txt, standing in for the Paul
Graham essays) and our own adjective/noun lists for keys (standing in for wonderwords). Samples
therefore differ from upstream RULER's; the task structure does not.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from random import Random
from typing import Any, Generic, TypeVar

from eval import client as client_lib
from eval.client import GenerationParams, OpenAICompatClient, ResultsFile, ServerConfig
from eval.tokens import PromptTokenizer

DATA_DIR = Path(__file__).parent / "ruler_data"

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assigned the value {query}, they are: "
)
# round(linspace(0, 100, 40)) as upstream; numpy's round-half-to-even gives the same integers.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
VT_EXAMPLE_NOISE_LINES = 10  # the one-shot example is short (upstream: ~500 tokens)


@dataclass(frozen=True)
class NiahTask:
    haystack: str  # "noise" | "essay" | "needle" (distractor needles)
    key_type: str  # "words" | "numbers" | "uuids"
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    tokens_to_generate: int = 128
    scoring: str = "string_match_all"

    @property
    def needles_per_sample(self) -> int:
        # Upstream sets num_needle_k = max(num_needle_k, num_needle_q).
        return max(self.num_keys, self.num_queries)


@dataclass(frozen=True)
class VariableTrackingTask:
    num_chains: int = 1
    num_hops: int = 4
    tokens_to_generate: int = 30
    scoring: str = "string_match_all"


Task = NiahTask | VariableTrackingTask

TASKS: dict[str, Task] = {
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_queries=4),
    "vt": VariableTrackingTask(),
}
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class Sample:
    input: str
    answer_prefix: str
    outputs: list[str]


# ------------------------------------------------------------------------------------- filler


@cache
def essay_sentences() -> tuple[str, ...]:
    paragraphs = DATA_DIR.joinpath("essay.txt").read_text("utf-8").split("\n")
    return tuple(s for p in paragraphs if p.strip() for s in re.split(r"(?<=[.!?])\s+", p.strip()))


@cache
def key_words() -> tuple[str, ...]:
    """adjective-noun keys, like upstream's wonderwords `adj-noun`."""
    adjectives = DATA_DIR.joinpath("adjectives.txt").read_text("utf-8").split()
    nouns = DATA_DIR.joinpath("nouns.txt").read_text("utf-8").split()
    return tuple(sorted({f"{adjective}-{noun}" for adjective in adjectives for noun in nouns}))


def essay_haystack(num_sentences: int) -> list[str]:
    """The first `num_sentences` sentences of the essay, repeated as often as needed."""
    sentences = essay_sentences()
    return [sentences[i % len(sentences)] for i in range(num_sentences)]


def random_item(rng: Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # 7 digits
    if kind == "words":
        return rng.choice(key_words())
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def distinct_items(rng: Random, kind: str, count: int) -> list[str]:
    items: list[str] = []
    while len(items) < count:
        item = random_item(rng, kind)
        if item not in items:
            items.append(item)
    return items


def item_other_than(rng: Random, kind: str, excluded: frozenset[str]) -> str:
    while True:
        item = random_item(rng, kind)
        if item not in excluded:
            return item


# --------------------------------------------------------------------------------------- NIAH


@dataclass(frozen=True)
class Haystack:
    context: str
    keys: list[str]
    values: list[list[str]]


def build_niah_haystack(task: NiahTask, rng: Random, size: int) -> Haystack:
    """A context of `size` haystack units (essay sentences, noise lines or distractor needles)
    with the task's needles hidden in it. Keys are distinct, and no distractor uses one of them
    (upstream does not check; a clash would make the question ambiguous)."""
    keys = distinct_items(rng, task.key_type, task.needles_per_sample)
    values = [[random_item(rng, task.value_type) for _ in range(task.num_values)] for _ in keys]
    needles = [
        NEEDLE.format(type_needle_v=task.value_type, key=key, value=value)
        for key, key_values in zip(keys, values)
        for value in key_values
    ]
    rng.shuffle(needles)
    if task.haystack == "essay":
        context = _insert_at_depths(essay_haystack(size), needles, rng)
    else:
        context = "\n".join(_insert_between_lines(_line_haystack(task, rng, size, frozenset(keys)), needles, rng))
    return Haystack(context, keys, values)


def _line_haystack(task: NiahTask, rng: Random, size: int, real_keys: frozenset[str]) -> list[str]:
    if task.haystack == "noise":
        return [NOISE_SENTENCE] * size
    if task.haystack == "needle":
        return [
            NEEDLE.format(
                type_needle_v=task.value_type,
                key=item_other_than(rng, task.key_type, real_keys),
                value=random_item(rng, task.value_type),
            )
            for _ in range(size)
        ]
    raise ValueError(f"unknown haystack {task.haystack!r}")


def _insert_between_lines(lines: list[str], needles: list[str], rng: Random) -> list[str]:
    """Each needle goes before a random line (or at the end); inserting from the back keeps the
    drawn positions valid."""
    positions = sorted((rng.randint(0, len(lines)) for _ in needles), reverse=True)
    lines = list(lines)
    for position, needle in zip(positions, needles):
        lines.insert(position, needle)
    return lines


def _insert_at_depths(sentences: list[str], needles: list[str], rng: Random) -> str:
    """Needles go between sentences at depths drawn from DEPTHS (percent of the document)."""
    cuts = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(needles)))
    boundaries = [0, *cuts, len(sentences)]
    pieces = []
    for i, needle in enumerate([*needles, None]):
        pieces.append(" ".join(sentences[boundaries[i] : boundaries[i + 1]]))
        if needle is not None:
            pieces.append(needle)
    return " ".join(piece for piece in pieces if piece)  # no double spaces between adjacent needles


def singularize(template: str) -> str:
    """Upstream's wording fix when a single value is asked for, applied to the whole string."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def join_queries(keys: Sequence[str]) -> str:
    return ", ".join(keys[:-1]) + ", and " + keys[-1] if len(keys) > 1 else keys[0]


def split_answer_prefix(text: str, answer_prefix_template: str) -> tuple[str, str]:
    """Upstream cuts the prompt at the last occurrence of the prefix's first 10 characters."""
    cut = text.rfind(answer_prefix_template[:10])
    return text[:cut], text[cut:]


def niah_prompt(task: NiahTask, context: str, queried_keys: Sequence[str]) -> tuple[str, str]:
    """(input, answer_prefix) asking for every value of `queried_keys`."""
    template = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
    value_type = task.value_type
    if len(queried_keys) * task.num_values == 1:
        template = singularize(template)
        value_type = value_type[:-1]
    text = template.format(type_needle_v=value_type, context=context, query=join_queries(queried_keys))
    return split_answer_prefix(text, NIAH_ANSWER_PREFIX)


def niah_sample(task: NiahTask, rng: Random, size: int) -> Sample:
    haystack = build_niah_haystack(task, rng, size)
    asked = rng.sample(range(len(haystack.keys)), task.num_queries)
    prompt, answer_prefix = niah_prompt(task, haystack.context, [haystack.keys[i] for i in asked])
    return Sample(prompt, answer_prefix, [value for i in asked for value in haystack.values[i]])


# ------------------------------------------------------------------------- variable tracking


def distinct_variable_names(rng: Random, count: int, length: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names:
            names.append(name)
    return names


def _variable_chains(
    rng: Random, num_chains: int, num_hops: int, name_length: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Per chain: its variable names, and its assignment lines (value first, then one per hop)."""
    names = distinct_variable_names(rng, num_chains * (num_hops + 1), name_length)
    chain_names, chain_lines = [], []
    for start in range(0, len(names), num_hops + 1):
        chain = names[start : start + num_hops + 1]
        lines = [f"VAR {chain[0]} = {rng.randint(10000, 99999)}"]
        lines += [f"VAR {chain[hop + 1]} = VAR {chain[hop]}" for hop in range(num_hops)]
        chain_names.append(chain)
        chain_lines.append(lines)
    return chain_names, chain_lines


def _variable_tracking_text(task: VariableTrackingTask, rng: Random, noise_lines: int, num_hops: int,
                            name_length: int) -> tuple[str, list[str]]:
    """Full text (template + answer prefix) and the names of the first chain."""
    chain_names, chain_lines = _variable_chains(rng, task.num_chains, num_hops, name_length)
    lines = [NOISE_SENTENCE] * noise_lines
    for chain in chain_lines:
        # Keep each chain in order: the j-th assignment goes before original line positions[j].
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for offset, (position, line) in enumerate(zip(positions, chain)):
            lines.insert(position + offset, line)
    value = chain_lines[0][0].split("=")[-1].strip()
    text = (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context="\n".join(lines), query=value, num_v=num_hops + 1)
    return text, chain_names[0]


def variable_tracking_sample(task: VariableTrackingTask, rng: Random, size: int) -> Sample:
    """A one-shot example (3-letter names, answer appended) followed by the real question."""
    example_text, example_answer = _variable_tracking_text(
        task, rng, VT_EXAMPLE_NOISE_LINES, min(10, task.num_hops), name_length=3
    )
    text, answer = _variable_tracking_text(task, rng, size, task.num_hops, name_length=5)
    full_text = example_text + " " + " ".join(example_answer) + "\n\n" + text
    prompt, answer_prefix = split_answer_prefix(full_text, VT_ANSWER_PREFIX)
    return Sample(prompt, answer_prefix, answer)


def minimum_haystack(task: Task) -> int:
    if isinstance(task, VariableTrackingTask):
        return task.num_hops + 1  # every assignment needs a distinct noise line to precede
    return 0


def make_sample(task: Task, rng: Random, size: int) -> Sample:
    if isinstance(task, VariableTrackingTask):
        return variable_tracking_sample(task, rng, size)
    return niah_sample(task, rng, size)


# ------------------------------------------------------------------------- length fitting


def largest_fitting_size(fits: Callable[[int], bool], minimum: int) -> int:
    """Largest haystack size with fits(size) true, assuming fits is monotone: grow by doubling,
    then binary search."""
    if not fits(minimum):
        raise ValueError("even the smallest haystack exceeds the token budget")
    low, high = minimum, max(minimum, 1) * 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def sample_rng(seed: int, name: str, max_seq_length: int, index: int) -> Random:
    # One independent stream per sample, so a sample does not depend on how the others came out.
    return Random(f"{seed}:{name}:{max_seq_length}:{index}")


SampleT = TypeVar("SampleT")


@dataclass(frozen=True)
class FittedSample(Generic[SampleT]):
    sample: SampleT
    length: int  # tokens, including the generation budget
    haystack_size: int


def fit_samples(build: Callable[[int, int], tuple[SampleT, int]], num_samples: int, max_seq_length: int,
                minimum_size: int) -> list[FittedSample[SampleT]]:
    """Samples as large as the budget allows. `build(index, size)` returns a sample and its length.

    As upstream: find the largest haystack size on sample 0, then shrink it for any sample whose
    random draws (longer keys, needles) push it over the budget.
    """
    size = largest_fitting_size(lambda size: build(0, size)[1] <= max_seq_length, minimum_size)
    shrink_step = max(1, size // 100)
    fitted = []
    for index in range(num_samples):
        used_size = size
        sample, length = build(index, used_size)
        while length > max_seq_length and used_size > minimum_size:
            used_size = max(minimum_size, used_size - shrink_step)
            sample, length = build(index, used_size)
        if length > max_seq_length:
            raise ValueError(f"sample {index} does not fit {max_seq_length} tokens")
        fitted.append(FittedSample(sample, length, used_size))
    return fitted


def generate_task(task_name: str, tokenizer: PromptTokenizer, max_seq_length: int, num_samples: int,
                  seed: int) -> list[dict[str, Any]]:
    """Samples whose `input + answer_prefix` tokens plus tokens_to_generate fit max_seq_length."""
    task = TASKS[task_name]

    def build(index: int, size: int) -> tuple[Sample, int]:
        sample = make_sample(task, sample_rng(seed, task_name, max_seq_length, index), size)
        return sample, tokenizer.count(sample.input + sample.answer_prefix) + task.tokens_to_generate

    fitted = fit_samples(build, num_samples, max_seq_length, minimum_haystack(task))
    return [
        {
            "id": f"{task_name}-{max_seq_length}-{index}",
            "task": task_name,
            "max_seq_length": max_seq_length,
            "index": index,
            "input": item.sample.input,
            "answer_prefix": item.sample.answer_prefix,
            "outputs": item.sample.outputs,
            "length": item.length,
            "tokens_to_generate": task.tokens_to_generate,
            "haystack_size": item.haystack_size,
        }
        for index, item in enumerate(fitted)
    ]


@dataclass(frozen=True)
class GenerateConfig:
    tokenizer_path: str
    out_dir: Path
    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    num_samples: int = 500
    seed: int = 42


def data_file(root: Path, max_seq_length: int, task_name: str) -> Path:
    return root / str(max_seq_length) / f"{task_name}.jsonl"


def generate(config: GenerateConfig, tokenizer: PromptTokenizer | None = None) -> list[Path]:
    tokenizer = tokenizer or PromptTokenizer.from_path(config.tokenizer_path)
    written = []
    for max_seq_length in config.lengths:
        for task_name in config.tasks:
            path = data_file(config.out_dir, max_seq_length, task_name)
            samples = generate_task(task_name, tokenizer, max_seq_length, config.num_samples, config.seed)
            client_lib.write_jsonl(path, samples)
            written.append(path)
    return written


# ------------------------------------------------------------------------------------ run/score


def predict(client: OpenAICompatClient, sample: Mapping[str, Any]) -> dict[str, Any]:
    """Raw text `input + answer_prefix` (upstream `base` template: no chat template), greedy."""
    params = GenerationParams(max_tokens=sample["tokens_to_generate"], temperature=0.0)
    prediction = client.complete(sample["input"] + sample["answer_prefix"], params)
    return {key: sample[key] for key in ("id", "task", "max_seq_length", "outputs")} | {"pred": prediction}


def data_files(data_dir: Path, tasks: Sequence[str] | None, lengths: Sequence[int] | None) -> list[Path]:
    """DIR/{length}/{task}.jsonl files of known tasks, shortest length first."""
    files = [p for p in data_dir.glob("*/*.jsonl") if p.parent.name.isdigit() and p.stem in TASKS]
    return [
        path for path in sorted(files, key=lambda p: (int(p.parent.name), list(TASKS).index(p.stem)))
        if (not tasks or path.stem in tasks) and (not lengths or int(path.parent.name) in lengths)
    ]


def run(data_dir: Path, out_dir: Path, server: ServerConfig, concurrency: int,
        tasks: Sequence[str] | None = None, lengths: Sequence[int] | None = None) -> list[client_lib.RunSummary]:
    summaries = []
    with OpenAICompatClient(server, max_connections=concurrency) as client:
        for path in data_files(data_dir, tasks, lengths):
            name = f"{path.stem}@{path.parent.name}"
            results = ResultsFile(out_dir / path.parent.name / path.name, id_field="id")
            samples = client_lib.read_jsonl(path)
            summary = client_lib.run_pending(samples, partial(predict, client), results, concurrency, name)
            client_lib.log_summary(name, summary)
            summaries.append(summary)
    return summaries


def postprocess_prediction(prediction: str) -> str:
    prediction = prediction.strip()
    return re.sub(r"[\x00-\x1f]", "\n", prediction).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean share of the references found (case-insensitive substring), x100, 2 decimals."""
    found = [
        sum(1.0 if reference.lower() in prediction.lower() else 0.0 for reference in refs) / len(refs)
        for prediction, refs in zip(predictions, references)
    ]
    return round(sum(found) / len(predictions) * 100, 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of predictions containing at least one reference, x100, 2 decimals."""
    found = [
        max(1.0 if reference.lower() in prediction.lower() else 0.0 for reference in refs)
        for prediction, refs in zip(predictions, references)
    ]
    return round(sum(found) / len(predictions) * 100, 2)


SCORERS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score_records(task_name: str, records: Sequence[Mapping[str, Any]]) -> float:
    predictions = [postprocess_prediction(record["pred"]) for record in records]
    return SCORERS[TASKS[task_name].scoring](predictions, [record["outputs"] for record in records])


def score_dir(pred_dir: Path) -> dict[str, Any]:
    """Per length: every task's score and their plain mean (upstream averages tasks)."""
    result: dict[str, Any] = {}
    for path in data_files(pred_dir, None, None):
        records = client_lib.read_jsonl(path)
        if records:
            length = result.setdefault(path.parent.name, {"tasks": {}, "num_samples": {}})
            length["tasks"][path.stem] = score_records(path.stem, records)
            length["num_samples"][path.stem] = len(records)
    for length in result.values():
        length["average"] = round(sum(length["tasks"].values()) / len(length["tasks"]), 2)
    return result


def format_score_table(result: Mapping[str, Any]) -> str:
    lengths = list(result)
    tasks = [name for name in TASKS if any(name in result[length]["tasks"] for length in lengths)]
    lines = ["| Task | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for task_name in tasks:
        cells = [_cell(result[length]["tasks"].get(task_name)) for length in lengths]
        lines.append(f"| {task_name} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(_cell(result[length]["average"]) for length in lengths) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------------------- CLI


def _int_list(value: str) -> tuple[int, ...]:
    return tuple(int(item) for item in value.split(",") if item.strip())


def _task_list(value: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in value.split(",") if item.strip())
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.ruler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    generate_parser = commands.add_parser("generate", help="write DATA/{length}/{task}.jsonl")
    generate_parser.add_argument("--tokenizer", required=True, help="local folder of the served model's tokenizer")
    generate_parser.add_argument("--out-dir", type=Path, required=True)
    generate_parser.add_argument("--tasks", type=_task_list, default=tuple(TASKS))
    generate_parser.add_argument("--lengths", type=_int_list, default=DEFAULT_LENGTHS, help="max_seq_length values")
    generate_parser.add_argument("--num-samples", type=int, default=500)
    generate_parser.add_argument("--seed", type=int, default=42)

    run_parser = commands.add_parser("run", help="send input + answer_prefix to /v1/completions (resumable)")
    run_parser.add_argument("--data-dir", type=Path, required=True)
    run_parser.add_argument("--out-dir", type=Path, required=True)
    run_parser.add_argument("--tasks", type=_task_list)
    run_parser.add_argument("--lengths", type=_int_list)
    client_lib.add_server_arguments(run_parser)

    score_parser = commands.add_parser("score", help="string_match scores per task and length")
    score_parser.add_argument("pred_dir", type=Path)
    score_parser.add_argument("--output", type=Path, help="JSON path (default: PREDS/result.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    client_lib.setup_logging()
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        config = GenerateConfig(args.tokenizer, args.out_dir, args.tasks, args.lengths, args.num_samples, args.seed)
        for path in generate(config):
            print(path)
        return 0
    if args.command == "run":
        summaries = run(args.data_dir, args.out_dir, client_lib.server_config_from_args(args), args.concurrency,
                        args.tasks, args.lengths)
        return 1 if any(summary.failed for summary in summaries) else 0
    result = score_dir(args.pred_dir)
    output = args.output or args.pred_dir / "result.json"
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_score_table(result), end="")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
