"""The tiny model's tokenizer: a byte-level BPE trained with `tokenizers` on the task text.

Qwen2-style: the same pre-tokenizer regex (every digit is its own pre-token, so numbers are
spelled digit by digit and copying them is learnable; a space opens a word), byte-level
fallback for any text, `<|endoftext|>` / `<|im_start|>` / `<|im_end|>` special tokens and a
ChatML chat template. Saved as a Hugging Face tokenizer folder that
`transformers.AutoTokenizer.from_pretrained(path)` and SGLang load offline.

    python -m eval.tiny.tokenizer --out DIR [--vocab-size 4096] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from random import Random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from eval.tiny import tasks

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
EOS_TOKEN = IM_END  # ends every answer, raw completion or chat turn
PAD_TOKEN = ENDOFTEXT
# Qwen2's pre-tokenizer pattern.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEFAULT_VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 8192


def training_corpus(seed: int = 0, samples_per_task: int = 150) -> Iterator[str]:
    """Everything the tasks write: filler paragraphs, number sentences, key words, and whole
    prompts with answers (sized in approximate tokens; their text is what matters here)."""
    rng = Random(f"tiny-tokenizer:{seed}")
    for paragraph in tasks.filler_paragraphs():
        yield " ".join(paragraph)
    for _ in range(500):
        yield tasks.number_sentence(rng)
    for words in tasks.key_words():
        yield " ".join(words)
    for label in tasks.DECOY_LABELS:
        yield f"The {label} is {tasks.random_number(rng, 6)}."
    for task in tasks.TASK_NAMES:
        for _ in range(samples_per_task):
            sample = tasks.make_sample(task, rng, tasks.approximate_piece_encoder, rng.choice((256, 512, 1024)))
            yield sample.prompt + tasks.completion(sample.answer)
    yield "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte encodes, even unseen ones
    )
    tokenizer.train_from_iterator(training_corpus(seed), trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added_tokens = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
    }
    special_tokens_map = {
        "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": [IM_START, IM_END],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")
    return out_dir


def load_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and save the tiny model's tokenizer.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.vocab_size, args.seed)
    save_tokenizer(tokenizer, args.out)
    print(f"{tokenizer.get_vocab_size()} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
