"""The served model's tokenizer, loaded from a local folder, for client-side truncation and
token budgets.
"""

from __future__ import annotations

import threading
from typing import Any


class PromptTokenizer:
    """A Hugging Face tokenizer behind a lock.

    Fast tokenizers raise "Already borrowed" when one instance is used from several threads,
    and the suites build prompts inside their worker threads.
    """

    def __init__(self, hf_tokenizer: Any):
        self._tokenizer = hf_tokenizer
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, path: str) -> PromptTokenizer:
        from transformers import AutoTokenizer  # slow import; only the commands that need it pay

        return cls(AutoTokenizer.from_pretrained(path))

    def count(self, text: str) -> int:
        """Tokens of `text` without special tokens (RULER's `text_to_tokens` length)."""
        with self._lock:
            return len(self._tokenizer.encode(text, add_special_tokens=False))

    def last_token_id(self, text: str) -> int:
        """Id of the last token of `text`, e.g. the "\\n" token LongBench stops samsum on."""
        with self._lock:
            return self._tokenizer.encode(text, add_special_tokens=False)[-1]

    def truncate_middle_longbench(self, prompt: str, max_length: int) -> str:
        """LongBench v1 `pred.py`: keep int(max_length/2) tokens from each end (ids counted with
        special tokens) and decode the two halves separately."""
        with self._lock:
            ids = self._tokenizer(prompt).input_ids
            if len(ids) <= max_length:
                return prompt
            half = int(max_length / 2)
            head = self._tokenizer.decode(ids[:half], skip_special_tokens=True)
            tail = self._tokenizer.decode(ids[-half:], skip_special_tokens=True)
            return head + tail

    def truncate_middle_longbench_v2(self, prompt: str, max_length: int) -> str:
        """LongBench v2 `pred.py`: `ids[:max_len//2] + ids[-max_len//2:]`, decoded in one piece.

        `-max_length // 2` is `(-max_length) // 2`, so an odd budget keeps one extra tail token,
        as upstream does.
        """
        with self._lock:
            ids = self._tokenizer.encode(prompt)
            if len(ids) <= max_length:
                return prompt
            kept = ids[: max_length // 2] + ids[-max_length // 2 :]
            return self._tokenizer.decode(kept, skip_special_tokens=True)
