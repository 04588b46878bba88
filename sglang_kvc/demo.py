"""`sglang-kvc demo`: the same prompts answered with a full and a compressed KV cache.

    sglang-kvc demo [--config configs/qwen_8x_tuned.yaml] [--model PATH] [--device cpu|cuda] [--samples 3]

Loads a local transformers model folder (by default the project's bundled small model,
`eval/tiny/model`, trained by `python -m eval.tiny.train`), builds a few seeded retrieval
prompts in the formats that model was trained on (`eval/tiny/tasks.py`: pass key, key-value
lookup), answers each greedily with a full `DynamicCache` and with the
sglang-kvc policy (`hf_reference.CompressedCache`), and prints both answers and what
each KV cache would occupy. torch/transformers are imported only when the demo runs,
so the rest of the command line stays quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sglang_kvc.argtypes import positive_int

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL_DIR = REPO / "eval" / "tiny" / "model"
DEFAULT_CONFIG = REPO / "configs" / "qwen_8x_tuned.yaml"
EXIT_USAGE = 2
SEED = 20251129

# ---- prompts -----------------------------------------------------------------------------------
# The bundled model's own task formats (eval/tiny/tasks.py), so that the demo asks what the
# model was trained to answer. They live in the checkout next to the model, not in the
# installed package: the demo runs from a clone.
DEMO_TASKS = ("passkey", "kv")


def _import_tiny():
    """(eval.tiny.tasks, eval.tiny.quality): the task formats and the model loader."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from eval.tiny import quality, tasks

    return tasks, quality


# ---- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        metavar="CONFIG",
        help="compression config YAML (default: configs/qwen_8x_tuned.yaml)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="local transformers model folder (default: the bundled eval/tiny/model)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--samples", type=positive_int, default=3, metavar="N", help="prompts (default: 3)")
    parser.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=1024,
        metavar="N",
        help="prompt length, capped by the model's context (default: 1024)",
    )


def _error(message: str) -> int:
    print(f"sglang-kvc demo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(args: argparse.Namespace) -> int:
    from sglang_kvc.config import load_config

    config = load_config(args.config)  # a bad config raises ConfigError: cli.main prints it
    if args.model is None:
        model_dir = BUNDLED_MODEL_DIR
        if not (model_dir / "model.safetensors").is_file():
            return _error(
                f"the bundled model is not there ({model_dir}); it is trained by "
                f"`python -m eval.tiny.train`, or pass --model PATH to a local model folder"
            )
    else:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            return _error(f"--model: no model folder at {model_dir}")

    import torch

    from sglang_kvc.hf_reference import generate_with_cache, model_shape
    from sglang_kvc.planner import plan_for

    tasks, quality = _import_tiny()
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: no CUDA device is available")
    try:
        loaded = quality.TinyEvaluator(model_dir, args.device)
    except (OSError, ValueError) as exc:
        return _error(f"cannot load a model and tokenizer.json from {model_dir}: {exc}")
    model, tokenizer, encode, end_of_answer = loaded.model, loaded.tokenizer, loaded.encode, loaded.end_of_answer

    shape = model_shape(model.config)
    plan_for(config, shape)  # a config that does not fit the model (group size, Hadamard) stops here
    length = min(args.prompt_tokens, shape.context_len)
    if length < tasks.MIN_LENGTH:
        return _error(f"--prompt-tokens: at least {tasks.MIN_LENGTH} (the shortest prompt every task fits)")
    print(
        f"sglang-kvc demo: {model_dir} ({type(model).__name__}, {shape.num_layers} layers, "
        f"{shape.kv_heads} KV heads, head_dim {shape.head_dim}), config {config.name}, "
        f"device {args.device}"
    )
    correct = {"full": 0, "compressed": 0}
    for index in range(args.samples):
        task = DEMO_TASKS[index % len(DEMO_TASKS)]
        sample = tasks.make_sample(task, tasks.sample_rng(SEED, "demo", task, length, index), encode, length)
        print(
            f"\nsample {index + 1}/{args.samples}: {task}, {len(sample.prompt_ids):,} prompt tokens, "
            f"answer {sample.answer} at {sample.depth:.0%} depth"
            if sample.depth is not None else
            f"\nsample {index + 1}/{args.samples}: {task}, {len(sample.prompt_ids):,} prompt tokens, "
            f"answer {sample.answer}"
        )
        for label, cache_config in (("full", None), ("compressed", config)):
            result = generate_with_cache(model, list(sample.prompt_ids), cache_config, tasks.MAX_NEW_TOKENS[task],
                                         eos_token_id=end_of_answer)
            answer = tasks.extract_answer(tokenizer.decode(result.token_ids, skip_special_tokens=True))
            hit = answer == sample.answer
            correct[label] += hit
            note = "bf16" if cache_config is None else (
                f"{result.bf16_kv_bytes / result.kv_bytes:.2f}x smaller; kept tokens per layer "
                f"{max(result.cache.kept_tokens())}..{min(result.cache.kept_tokens())}"
            )
            print(
                f"  {label + ' cache':<17} answer {answer!r:<22} {'correct' if hit else 'wrong':<8}"
                f" KV {result.kv_bytes:>12,} bytes ({note})"
            )
    print(
        f"\nexact answers: full cache {correct['full']}/{args.samples}, "
        f"compressed cache {correct['compressed']}/{args.samples}"
    )
    return 0
