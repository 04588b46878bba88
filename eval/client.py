"""Shared pieces of every suite: the OpenAI-compatible HTTP client, resumable jsonl results and
the concurrent runner with a progress bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Worth retrying: the server is overloaded, restarting or timed out. Other 4xx (e.g. a prompt
# longer than the context window) will fail the same way again.
TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})


class RequestFailed(RuntimeError):
    """A request that failed for good (non-transient error, or retries exhausted)."""


@dataclass(frozen=True)
class ServerConfig:
    base_url: str = "http://127.0.0.1:30000"
    # SGLang serves one model and accepts any name here.
    model: str = "default"
    api_key: str = "EMPTY"
    timeout_s: float = 3600.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    # SGLang extensions of the OpenAI schema; sent only when set so plain OpenAI servers work.
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.stop:
            body["stop"] = list(self.stop)
        if self.stop_token_ids:
            body["stop_token_ids"] = list(self.stop_token_ids)
        if self.min_tokens:
            body["min_tokens"] = self.min_tokens
        return body


class OpenAICompatClient:
    """Thread-safe client for an SGLang (or any OpenAI-compatible) server."""

    def __init__(self, config: ServerConfig, max_connections: int = 64):
        self.config = config
        self._http = httpx.Client(
            base_url=config.base_url.rstrip("/"),
            timeout=config.timeout_s,
            headers={"Authorization": f"Bearer {config.api_key}"},
            limits=httpx.Limits(max_connections=max_connections),
        )

    def __enter__(self) -> OpenAICompatClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def complete(self, prompt: str, params: GenerationParams) -> str:
        """Raw-text completion (`/v1/completions`): no chat template is applied."""
        body = {"model": self.config.model, "prompt": prompt, **params.payload()}
        return self._post("/v1/completions", body).json()["choices"][0]["text"]

    def chat(self, user_message: str, params: GenerationParams) -> str:
        """One user turn through `/v1/chat/completions`; the server applies the chat template."""
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": user_message}],
            **params.payload(),
        }
        return self._post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"] or ""

    def flush_cache(self) -> None:
        """Empty SGLang's radix (prefix) cache so a run starts cold."""
        self._post("/flush_cache", {})

    def _post(self, path: str, body: Mapping[str, Any]) -> httpx.Response:
        for attempt in range(self.config.max_retries + 1):
            try:
                response = self._http.post(path, json=body)
            except httpx.TransportError as error:  # connection refused/reset, timeouts
                failure = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response
                failure = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in TRANSIENT_STATUS_CODES:
                    raise RequestFailed(f"POST {path} -> {failure}")
            if attempt < self.config.max_retries:
                delay = min(self.config.backoff_s * 2**attempt, self.config.max_backoff_s)
                logger.warning("POST %s failed (%s); retry %d in %.1fs", path, failure, attempt + 1, delay)
                time.sleep(delay)
        raise RequestFailed(f"POST {path} failed after {self.config.max_retries + 1} attempts: {failure}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a jsonl file; a torn last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d is not valid JSON; ignored", path, line_number)
    return records


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


class ResultsFile:
    """Append-only jsonl of finished items, keyed by an id field: what makes runs resumable."""

    def __init__(self, path: Path, id_field: str):
        self.path = path
        self.id_field = id_field
        self._lock = threading.Lock()

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def done_ids(self) -> set[str]:
        return {str(record[self.id_field]) for record in self.records() if self.id_field in record}

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                if f.tell() > 0 and not _ends_with_newline(self.path):
                    f.write(b"\n")  # keep a torn last line from swallowing this record
                f.write(line)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


@dataclass(frozen=True)
class RunSummary:
    already_done: int
    completed: int
    skipped: int
    failed: int


def run_pending(
    items: Iterable[Mapping[str, Any]],
    worker: Callable[[Mapping[str, Any]], Mapping[str, Any] | None],
    results: ResultsFile,
    concurrency: int,
    description: str,
) -> RunSummary:
    """Run `worker` on every item whose id is not in `results` yet and append what it returns.

    A worker returning None skips its item; a worker raising is logged. Neither is written, so
    the next run retries them.
    """
    done = results.done_ids()
    pending = [item for item in items if str(item[results.id_field]) not in done]
    already_done = len(done)
    completed = skipped = failed = 0
    if not pending:
        return RunSummary(already_done, 0, 0, 0)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(worker, item): item for item in pending}
        for future in tqdm(as_completed(futures), total=len(futures), desc=description, unit="req"):
            item_id = futures[future][results.id_field]
            try:
                record = future.result()
            except Exception as error:
                failed += 1
                logger.error("%s: item %s failed: %s", description, item_id, error)
                continue
            if record is None:
                skipped += 1
                continue
            results.append(record)
            completed += 1
    return RunSummary(already_done, completed, skipped, failed)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=ServerConfig.base_url, help="SGLang server root URL")
    parser.add_argument("--model", default=ServerConfig.model, help="model name sent in requests")
    parser.add_argument("--api-key", default=ServerConfig.api_key)
    parser.add_argument("--timeout", type=float, default=ServerConfig.timeout_s, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=ServerConfig.max_retries)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
    )


def log_summary(name: str, summary: RunSummary) -> None:
    logger.info(
        "%s: %d already done, %d completed, %d skipped, %d failed",
        name, summary.already_done, summary.completed, summary.skipped, summary.failed,
    )


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the progress bar
