"""Helpers shared by the eval tests (a uniquely named module: `conftest` may name another file)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

FIXTURES = Path(__file__).parent / "fixtures"
# Words and punctuation runs, plus "\n" as a token of its own (LongBench stops samsum on it).
WORD_PATTERN = r"\w+|[^\w\s]+|\n"
BOS = "<s>"
UNK = "[UNK]"


def build_word_tokenizer(folder: Path, texts: Iterable[str], add_bos: bool = True) -> Path:
    """Save a WordLevel tokenizer over the words of `texts` as a Hugging Face tokenizer folder
    (tokenizer.json + tokenizer_config.json). With `add_bos`, every encoding starts with <s>,
    like Llama's, so truncation has a special token to count and to skip when decoding."""
    splitter = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)
    vocab = {UNK: 0, BOS: 1}
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    vocab.setdefault("\n", len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = splitter
    tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(UNK, special=True)])
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "unk_token": UNK}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
