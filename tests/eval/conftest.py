"""Fixtures for the eval tooling tests: a word-level HF tokenizer folder and a local fake server."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parents[1]
for path in (REPO_ROOT, TESTS_DIR):  # `import eval.*` and the helpers, whatever the import mode
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from eval_fake_server import FakeOpenAIServer  # noqa: E402
from eval_test_support import build_word_tokenizer  # noqa: E402


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> Callable[..., Path]:
    """Factory: word_tokenizer(texts, add_bos=True) -> folder usable with AutoTokenizer."""
    def build(texts: Iterable[str] = (), add_bos: bool = True) -> Path:
        return build_word_tokenizer(tmp_path / "tokenizer", texts, add_bos)
    return build


@pytest.fixture
def fake_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server
