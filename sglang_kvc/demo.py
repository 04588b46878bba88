"""`sglang-kvc demo`: the same prompts answered with a full and a compressed KV cache.

    sglang-kvc demo [--config configs/qwen_8x.yaml] [--model PATH] [--device cpu|cuda] [--samples 3]

Loads a local transformers model folder (by default the project's bundled small model,
`eval/tiny/model`, trained by `python -m eval.tiny.train`), builds a few seeded passkey
retrieval prompts, answers each greedily with a full `DynamicCache` and with the
sglang-kvc policy (`hf_reference.CompressedCache`), and prints both answers and what
each KV cache would occupy. torch/transformers are imported only when the demo runs,
so the rest of the command line stays quick.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from sglang_kvc.argtypes import positive_int

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL_DIR = REPO / "eval" / "tiny" / "model"
DEFAULT_CONFIG = REPO / "configs" / "qwen_8x.yaml"
EXIT_USAGE = 2
SEED = 20251129

# ---- passkey prompts (a local stand-in until eval/tiny/tasks.py exists) ----------------------

_INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key.\n"
)
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    passkey: str
    depth: float  # where the needle sits, as a fraction of the filler


def passkey_prompt(tokenizer, target_tokens: int, rng: random.Random) -> PasskeyPrompt:
    """A passkey prompt of at most `target_tokens` tokens (at least one filler line)."""
    passkey = str(rng.randrange(10_000, 100_000))
    depth = rng.random()

    def build(filler_lines: int) -> str:
        before = round(filler_lines * depth)
        return (
            _INTRO
            + _FILLER * before
            + _NEEDLE.format(key=passkey)
            + _FILLER * (filler_lines - before)
            + _QUESTION
        )

    def length(filler_lines: int) -> int:
        return len(tokenizer(build(filler_lines))["input_ids"])

    per_line = max(1, length(2) - length(1))
    lines = max(1, (target_tokens - length(0)) // per_line + 1)
    while lines > 1 and length(lines) > target_tokens:
        lines -= 1
    return PasskeyPrompt(build(lines), passkey, depth)


# ---- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        metavar="CONFIG",
        help="compression config YAML (default: configs/qwen_8x.yaml)",
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
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=8, metavar="N", help="answer length (default: 8)"
    )


def _error(message: str) -> int:
    print(f"sglang-kvc demo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _answer_text(tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip().split("\n")[0]


def main(args: argparse.Namespace) -> int:
    from sglang_kvc.config import load_config

    config = load_config(args.config)  # a bad config raises ConfigError: cli.main prints it
    if args.model is None:
        model_dir = BUNDLED_MODEL_DIR
        if not model_dir.is_dir():
            return _error(
                f"the bundled model is not there yet ({model_dir}); it is trained by "
                f"`python -m eval.tiny.train`, or pass --model PATH to a local model folder"
            )
    else:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            return _error(f"--model: no model folder at {model_dir}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from sglang_kvc.hf_reference import generate_with_cache, model_shape
    from sglang_kvc.planner import plan_for

    transformers_logging.disable_progress_bar()

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: no CUDA device is available")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    except (OSError, ValueError) as exc:
        return _error(f"cannot load a model and tokenizer from {model_dir}: {exc}")

    shape = model_shape(model.config)
    plan_for(config, shape)  # a config that does not fit the model (group size, Hadamard) stops here
    prompt_tokens = min(args.prompt_tokens, shape.context_len - args.max_new_tokens)
    print(
        f"sglang-kvc demo: {model_dir} ({type(model).__name__}, {shape.num_layers} layers, "
        f"{shape.kv_heads} KV heads, head_dim {shape.head_dim}), config {config.name}, "
        f"device {args.device}"
    )
    rng = random.Random(SEED)
    correct = {"full": 0, "compressed": 0}
    for sample in range(1, args.samples + 1):
        prompt = passkey_prompt(tokenizer, prompt_tokens, rng)
        encoded = tokenizer(prompt.text, return_tensors="pt")
        print(
            f"\nsample {sample}/{args.samples}: {encoded['input_ids'].shape[1]:,} prompt tokens, "
            f"pass key {prompt.passkey} at {prompt.depth:.0%} depth"
        )
        full = generate_with_cache(
            model, encoded, None, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id
        )
        compressed = generate_with_cache(
            model, encoded, config, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id
        )
        for label, result in (("full", full), ("compressed", compressed)):
            answer = _answer_text(tokenizer, result.token_ids)
            hit = prompt.passkey in answer
            correct[label] += hit
            note = "bf16" if label == "full" else (
                f"{result.bf16_kv_bytes / result.kv_bytes:.2f}x smaller; kept tokens per layer "
                f"{max(result.cache.kept_tokens())}..{min(result.cache.kept_tokens())}"
            )
            print(
                f"  {label + ' cache':<17} answer {answer!r:<22} {'correct' if hit else 'wrong':<8}"
                f" KV {result.kv_bytes:>12,} bytes ({note})"
            )
    print(
        f"\npass key found: full cache {correct['full']}/{args.samples}, "
        f"compressed cache {correct['compressed']}/{args.samples}"
    )
    return 0
