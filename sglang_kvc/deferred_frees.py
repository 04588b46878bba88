"""Rows of freed tokens, returned to their free lists once the device has counted them.

Freeing a token returns its row in every layer and tier it is held in. How many rows of
each tier a layer gets back is known only on the device (eviction chose them there), and
the free lists' tops are host counters (`stores.RowFreeList`). Reading the counts back at
once is a host sync: under SGLang's overlap scheduler the frees of finished requests run
while the next forward is in flight, and the sync waits for that forward, so the host
cannot prepare the one after it. Instead the pool queues the counting and a copy of the
counts to pinned host memory behind an event (`push`), and gives the rows back once the
event has completed (`completed`): at the next accounting query, or at once, waiting for
the device, where a caller needs the rows now (`completed(wait=True)`).

Until then the rows are neither free nor held, so the headroom the allocator reports is
lower than the truth by at most the pending tokens' rows; it never admits more than the
tiers can store.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class PendingFree:
    """One `free_tokens` call whose rows are not yet back on their free lists."""

    counts: torch.Tensor  # host int64 [2 * layers + 1]: per layer low-bit rows, per layer guard rows, staged tokens
    ordered_rows: torch.Tensor  # device [layers, tokens]: each layer's low-bit rows first, then its guard rows
    staging_rows: torch.Tensor  # device [tokens]: the staged tokens' staging rows first
    tokens: int  # how many token ids were freed: a bound on the rows of any one layer
    done: torch.cuda.Event | None  # None when the counts were computed on the host

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


class DeferredFrees:
    """The queue of pending frees, oldest first."""

    def __init__(self) -> None:
        self._pending: collections.deque[PendingFree] = collections.deque()

    def __len__(self) -> int:
        return len(self._pending)

    def pending_tokens(self) -> int:
        return sum(freed.tokens for freed in self._pending)

    def push(self, counts: torch.Tensor, ordered_rows: torch.Tensor, staging_rows: torch.Tensor) -> None:
        """Queue a free whose `counts` are still being computed on the device."""
        done = None
        if counts.is_cuda:
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            counts = host
        self._pending.append(PendingFree(counts, ordered_rows, staging_rows, staging_rows.numel(), done))

    def completed(self, wait: bool = False) -> Iterator[PendingFree]:
        """The pending frees whose counts are on the host, oldest first, each removed from the
        queue as it is yielded; with `wait`, every one (waiting for the device)."""
        while self._pending and (wait or self._pending[0].ready()):
            freed = self._pending.popleft()
            if not freed.ready():
                freed.wait()
            yield freed

    def clear(self) -> None:
        self._pending.clear()
