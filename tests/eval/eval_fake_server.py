"""A tiny stand-in for an OpenAI-compatible server (stdlib only), bound to 127.0.0.1.

It answers deterministically through a `responder(path, body) -> str` and records every request
it received, in arrival order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[str, dict[str, Any]], str]


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    body: dict[str, Any]

    @property
    def prompt(self) -> str:
        """The text the model would see: the raw prompt, or the single user message."""
        if "prompt" in self.body:
            return self.body["prompt"]
        return self.body["messages"][0]["content"]


def echo_tail(path: str, body: dict[str, Any]) -> str:
    """Default answer: the last 20 characters of the prompt."""
    return ReceivedRequest(path, body).prompt[-20:]


class FakeOpenAIServer:
    def __init__(self, responder: Responder = echo_tail):
        self.responder = responder
        self.requests: list[ReceivedRequest] = []
        self.failures_to_inject: list[int] = []  # status codes answered before any success
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown() (once per test) from waiting the default 0.5 s.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(ReceivedRequest(path, body))
            if self.failures_to_inject:
                return self.failures_to_inject.pop(0), b'{"error": "injected"}'
        if path == "/flush_cache":
            return 200, b"Cache flushed."  # SGLang answers plain text here
        text = self.responder(path, body)
        if path == "/v1/completions":
            payload = {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}
        elif path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            payload = {"object": "chat.completion", "choices": [choice]}
        else:
            return 404, b'{"error": "not found"}'
        return 200, json.dumps(payload).encode("utf-8")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                status, content = server._handle(self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep pytest output clean

        return Handler
