"""Accuracy of the tiny model on its held-out tasks, with a full KV cache and with
compression configs, through the transformers reference path (`sglang_kvc.hf_reference`).

    python -m eval.tiny.quality --configs configs/qwen_8x.yaml configs/qwen_12x.yaml \
        [--model eval/tiny/model] [--device cuda] [--tasks passkey kv] [--lengths 2048 8192] \
        [--samples 50] [--out DIR]

The same policy code as the SGLang path (policy.select_for_layer, quant) runs inside a
transformers forward, so this is where sweeps are cheap (no server start per config) and
where CI checks quality on the CPU. Per config it reports exact-match accuracy per task and
length, the mean over those cells, the accuracy relative to the full cache, and two
compression ratios: `measured` (bf16 bytes / compressed bytes of the caches these prompts
actually left, summed over samples) and `planned` (the planner's ratio for Qwen2.5-7B at a
32K prompt, i.e. what the config name promises on the real target).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eval.tiny import tasks

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "eval" / "tiny" / "model"
QWEN25_7B_CONFIG = REPO / "tests" / "data" / "qwen2.5-7b-instruct" / "config.json"
PLANNED_PROMPT_LEN = 32768
PLANNED_RATIO_BASIS = f"sglang_kvc.planner on Qwen2.5-7B, {PLANNED_PROMPT_LEN}-token prompt, incl. metadata"
FULL = "full"  # the result name of the uncompressed baseline


@dataclass(frozen=True)
class Suite:
    """Which held-out samples: `samples` per (task, length), from `seed` (tasks.eval_samples)."""

    tasks: tuple[str, ...] = ("passkey", "kv")
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    samples: int = 50
    seed: int = 0


@dataclass
class ConfigResult:
    name: str
    accuracy: dict[str, dict[int, float]]  # task -> length -> exact-match share
    kv_bytes: int  # summed over samples, at the end of generation
    bf16_kv_bytes: int
    planned_ratio: float | None
    seconds: float
    config: dict | None = None  # the CompressionConfig as a dict (None for the full cache)
    predictions: dict[str, str] = field(default_factory=dict)  # sample id -> first answer line

    @property
    def mean_accuracy(self) -> float:
        cells = [acc for by_length in self.accuracy.values() for acc in by_length.values()]
        return sum(cells) / len(cells)

    @property
    def measured_ratio(self) -> float:
        return self.bf16_kv_bytes / self.kv_bytes

    def to_json(self, full_mean: float | None = None) -> dict:
        summary = {
            "name": self.name,
            "mean_accuracy": self.mean_accuracy,
            "relative_accuracy": (self.mean_accuracy / full_mean) if full_mean else None,
            "measured_ratio": self.measured_ratio,
            "planned_ratio": self.planned_ratio,
            "accuracy": {task: {str(length): acc for length, acc in by_length.items()}
                         for task, by_length in self.accuracy.items()},
            "kv_bytes": self.kv_bytes,
            "bf16_kv_bytes": self.bf16_kv_bytes,
            "seconds": round(self.seconds, 2),
            "config": self.config,
        }
        return summary


def planned_ratio(config) -> float:
    """The planner's compression ratio (incl. metadata) on Qwen2.5-7B at a 32K prompt."""
    from sglang_kvc.planner import ModelShape, plan_for

    return plan_for(config, ModelShape.from_hf_config(QWEN25_7B_CONFIG)).compression_ratio(PLANNED_PROMPT_LEN)


class TinyEvaluator:
    """The bundled model (or another local folder) and its tokenizer, loaded once."""

    def __init__(self, model_dir: Path = MODEL_DIR, device: str = "cpu"):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"no trained model at {self.model_dir} (eval/tiny/README.md says how to train one)")
        self.device = device
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(device).eval()
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.encode = tasks.TokenizerPieceEncoder(self.tokenizer)
        self.end_of_answer = self.tokenizer.token_to_id("<|im_end|>")

    def samples(self, suite: Suite) -> dict[tuple[str, int], list[tasks.Sample]]:
        return tasks.eval_samples(self.encode, suite.tasks, suite.lengths, suite.samples, suite.seed)

    def answer(self, sample: tasks.Sample, config) -> tuple[str, int, int]:
        """(first answer line, KV bytes, bf16 KV bytes) of one greedy generation."""
        from sglang_kvc.hf_reference import generate_with_cache

        result = generate_with_cache(self.model, list(sample.prompt_ids), config, tasks.MAX_NEW_TOKENS[sample.task],
                                     eos_token_id=self.end_of_answer)
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        return tasks.extract_answer(text), result.kv_bytes, result.bf16_kv_bytes

    def evaluate(self, name: str, config, samples: Mapping[tuple[str, int], Sequence[tasks.Sample]],
                 progress: bool = False) -> ConfigResult:
        """Every sample with one config (None: the full cache)."""
        from dataclasses import asdict

        from tqdm import tqdm

        start = time.perf_counter()
        accuracy: dict[str, dict[int, float]] = {}
        predictions: dict[str, str] = {}
        kv_bytes = bf16_bytes = 0
        total = sum(len(group) for group in samples.values())
        with tqdm(total=total, desc=name, disable=not progress, leave=False) as bar:
            for (task, length), group in samples.items():
                correct = 0
                for index, sample in enumerate(group):
                    answer, kv, bf16 = self.answer(sample, config)
                    correct += answer == sample.answer
                    predictions[tasks.sample_id(task, length, index)] = answer
                    kv_bytes += kv
                    bf16_bytes += bf16
                    bar.update()
                accuracy.setdefault(task, {})[length] = correct / len(group)
        return ConfigResult(name, accuracy, kv_bytes, bf16_bytes,
                            planned_ratio(config) if config is not None else 1.0,
                            time.perf_counter() - start, asdict(config) if config is not None else None,
                            predictions)


def evaluate_configs(evaluator: TinyEvaluator, configs: Mapping[str, object], suite: Suite,
                     progress: bool = True) -> dict[str, ConfigResult]:
    """The full cache first (every relative accuracy is against it), then each config."""
    samples = evaluator.samples(suite)
    results = {FULL: evaluator.evaluate(FULL, None, samples, progress)}
    for name, config in configs.items():
        results[name] = evaluator.evaluate(name, config, samples, progress)
        if progress:
            result = results[name]
            print(f"{name}: accuracy {result.mean_accuracy:.3f} (full {results[FULL].mean_accuracy:.3f}), "
                  f"measured ratio {result.measured_ratio:.2f}x, planned {result.planned_ratio:.2f}x, "
                  f"{result.seconds:.0f} s", file=sys.stderr, flush=True)
    return results


def report(results: Mapping[str, ConfigResult], suite: Suite, evaluator: TinyEvaluator, command: str) -> dict:
    import datetime

    import torch
    import transformers

    full_mean = results[FULL].mean_accuracy
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": torch.cuda.get_device_name(0) if evaluator.device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": str(evaluator.model_dir.relative_to(REPO) if evaluator.model_dir.is_relative_to(REPO)
                     else evaluator.model_dir),
        "path": "transformers reference (sglang_kvc.hf_reference), greedy, exact match of the first answer line",
        "suite": {"tasks": list(suite.tasks), "lengths": list(suite.lengths), "samples": suite.samples,
                  "seed": suite.seed},
        "planned_ratio_basis": PLANNED_RATIO_BASIS,
        "results": {name: result.to_json(full_mean) for name, result in results.items()},
        "predictions": {name: result.predictions for name, result in results.items()},
    }


def markdown_table(report_json: dict) -> str:
    suite = report_json["suite"]
    columns = [(task, length) for task in suite["tasks"] for length in suite["lengths"]]
    lines = [
        "| config | planned ratio | measured ratio | mean acc | rel. to full | "
        + " | ".join(f"{task} {length}" for task, length in columns) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(columns),
    ]
    for name, result in report_json["results"].items():
        cells = [f"{result['accuracy'][task][str(length)]:.2f}" for task, length in columns]
        relative = result["relative_accuracy"]
        lines.append(
            f"| {name} | {result['planned_ratio']:.2f}x | {result['measured_ratio']:.2f}x | "
            f"{result['mean_accuracy']:.3f} | {'-' if relative is None else f'{100 * relative:.1f}%'} | "
            + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_suite_arguments(parser: argparse.ArgumentParser, defaults: Suite = Suite()) -> None:
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="local model folder (default: the bundled one)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--tasks", nargs="+", choices=tasks.TASK_NAMES, default=list(defaults.tasks))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(defaults.lengths))
    parser.add_argument("--samples", type=int, default=defaults.samples, help="per task and length")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def suite_from_args(args: argparse.Namespace) -> Suite:
    return Suite(tuple(args.tasks), tuple(args.lengths), args.samples, args.seed)


def load_configs(parser: argparse.ArgumentParser, paths: Sequence[Path]) -> dict:
    """Config YAMLs by name; a bad one ends the command with the parser's error (naming the key)."""
    from sglang_kvc.config import ConfigError, load_config

    try:
        return {config.name: config for config in map(load_config, paths)}
    except ConfigError as exc:
        parser.error(str(exc))


def write_report(out: Path | None, stem: str, report_json: dict, table: str) -> None:
    """OUT/STEM.json and OUT/STEM.md (the command, then the table), if `out` is given."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(report_json, indent=1))
        (out / f"{stem}.md").write_text(f"`{report_json['command']}`\n\n{table}")


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", type=Path, required=True, help="compression config YAMLs")
    parser.add_argument("--out", type=Path, help="folder for quality.json and quality.md")
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    configs = load_configs(parser, args.configs)
    evaluator = TinyEvaluator(args.model, args.device)
    suite = suite_from_args(args)
    results = evaluate_configs(evaluator, configs, suite)
    output = report(results, suite, evaluator, shlex.join(["python", "-m", "eval.tiny.quality", *argv]))
    table = markdown_table(output)
    print(table)
    write_report(args.out, "quality", output, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
