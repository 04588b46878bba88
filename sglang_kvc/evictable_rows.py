"""Per layer, the rows that evicting every unlocked radix node would free, kept up to date.

The admission hook (`patches.scheduler.admission_in_rows`) budgets by these rows. Walking the
radix tree for them on every admitting step costs O(cached nodes): 49 ms of host Python at
100K nodes (docs/results/admission-cost-2026-11-29.md). Instead the counter follows the same
transitions as RadixCache's own `evictable_size_` (`patches.radix_cache`): a node's rows are
added when it becomes unlocked (a new node, or its last lock released) and taken off when it
is locked again or evicted. That is exact because an unlocked node's rows do not change:
rows change when staged tokens are placed or sealed, and staged tokens in the tree belong to
a request still in prefill, which locks their node; a finished request's tokens are sealed
before its nodes are unlocked (`patches.scheduler.seal_released_request`).

The counts live on the device and are updated without host syncs. Admission reads a lower
bound without one either (`admission_rows`): the last copy of the counts that has reached
the host, less the tokens taken off since that copy was queued (a token holds at most one
row per layer; rows added since only make the bound looser). Reading the counts themselves
waits for the forward in flight, which with the overlap scheduler left the GPU idle while
the next prefill batch was prepared (serving run 20b: 9 of 81 ms per 64 x 512 prefill step).
The bound lags: it stays low after tokens are taken off (each counted as a row per layer)
until a copy queued after that lands, and it misses rows added since. A prefill that SGLang
turns down for want of tokens is not retried until a running request finishes (its
`batch_is_full`), so a bound that lagged when the last one finished left queued requests
waiting for ever on an idle server (first pressure run of 2026-11-30, fifteenth session).
So admission reads the exact counts when nothing is running (`refresh`: no decode step to
wait for, at most the last prefill), and tree eviction, whose frees have waited for the device already,
refreshes the bound after it. The idle check compares the exact counts with a walk of the
tree (`matches_tree`).

Updates are applied in batches (`flush`): a lock, unlock or insert only notes its tokens, and
the notes are counted together when the counts are read, before anything changes how many
rows a tree token holds, or every `FLUSH_EVERY` notes. Counted one by one, each cost ~7
launches (`rows_held` and the update), two or more per cached chunk of every prefilled
request (serving run 41's profile: the GPU idle 4.4 ms while the host ran them in the batch
result that ends a prefill; batched, the 64 x 512 prefill wall did not measurably change,
run 45). A note counted later counts what it would have counted at once as long as its
tokens' row counts have not changed since, and only two things change them: compression
(staged candidates, a row each, become evicted, none; the pool counts the notes first,
`pool._rows_will_change`) and eviction's frees (counted first, `remove_before_free`; SGLang's
radix cache frees tree tokens only by evicting them). Seals move staged tokens to the low-bit
tier, a row for a row. The device reads the map in the order the host queues the work, so a
count queued before the compression's writes sees the rows as they were.
"""

from __future__ import annotations

import torch

from sglang_kvc.pool import CompressedKVPool


class HostCopy:
    """A device tensor copied to the host without waiting: `start` queues the copy (into
    pinned memory on CUDA), `landed` says whether it has arrived. On the CPU it arrives at once."""

    def __init__(self, like: torch.Tensor) -> None:
        on_cuda = like.device.type == "cuda"
        self.host = torch.empty(like.shape, dtype=like.dtype, pin_memory=on_cuda)
        self._event = torch.cuda.Event() if on_cuda else None

    def start(self, tensor: torch.Tensor) -> None:
        self.host.copy_(tensor, non_blocking=True)
        if self._event is not None:
            self._event.record()

    def landed(self) -> bool:
        return self._event is None or self._event.query()


class EvictableRows:
    # Notes held before they are counted anyway: bounds the host memory they pin (views of
    # radix node values) and keeps each count a handful of launches however long the wait.
    FLUSH_EVERY = 256

    def __init__(self, pool: CompressedKVPool) -> None:
        self.pool = pool
        self._rows = torch.zeros(pool.layer_num, dtype=torch.int64, device=pool.location.device)
        # Tokens noted since the last flush, to be counted on (added) and off (removed).
        self._pending_added: list[torch.Tensor] = []
        self._pending_removed: list[torch.Tensor] = []
        pool.evictable_rows = self  # the pool counts the notes before compression changes rows
        self._copy = HostCopy(self._rows)
        # Tokens taken off so far (host count); a copy is tagged with the count when queued.
        self._removed_tokens = 0
        self._copy_in_flight: int | None = None  # the tag of the copy on its way
        self._landed: tuple[list[int], int] = ([0] * pool.layer_num, 0)  # (counts, tag) on the host

    def add(self, tokens: torch.Tensor) -> None:
        """`tokens` became evictable (their node was inserted unlocked, or unlocked)."""
        if tokens.numel():
            self._pending_added.append(tokens)
            self._flush_if_many()

    def remove(self, tokens: torch.Tensor) -> None:
        """`tokens` stop being evictable (their node was locked)."""
        if tokens.numel():
            self._pending_removed.append(tokens)
            self._removed_tokens += tokens.numel()
            self._flush_if_many()

    def remove_before_free(self, tokens: torch.Tensor) -> None:
        """`tokens` are being evicted: counted off now, with every earlier note, while they
        still hold their rows."""
        self.remove(tokens)
        self.flush()

    def flush(self) -> None:
        """Count the noted tokens: a few launches for all of them."""
        for pending, sign in ((self._pending_added, 1), (self._pending_removed, -1)):
            if pending:
                held = self.pool.rows_held(torch.cat(pending) if len(pending) > 1 else pending[0])
                self._rows.add_(held, alpha=sign)
                pending.clear()

    def _flush_if_many(self) -> None:
        if len(self._pending_added) + len(self._pending_removed) >= self.FLUSH_EVERY:
            self.flush()

    def per_layer(self) -> list[int]:
        """The exact counts (a device sync on a GPU: for checks)."""
        self.flush()
        return self._rows.tolist()

    def refresh(self) -> list[int]:
        """The exact counts (a device sync), which also become the bound's basis: for callers
        that have waited for the device anyway (tree eviction) or have little in flight to
        wait for (admission with nothing running)."""
        counts = self.per_layer()
        self._landed = (counts, self._removed_tokens)
        self._copy_in_flight = None  # an older copy: it landed in the sync
        return counts

    def admission_rows(self) -> list[int]:
        """Per layer, rows that evicting every unlocked node frees at least, without a
        device sync: from the last copy of the counts that has landed on the host (and a new
        copy queued for the next call)."""
        self._take_landed_copy()
        if self._copy_in_flight is None:
            self.flush()  # the copy is tagged with every removal so far: it must count them
            self._copy.start(self._rows)
            self._copy_in_flight = self._removed_tokens
            self._take_landed_copy()  # the CPU: it has landed already, no reason to wait for the next call
        counts, tag = self._landed
        removed_since = self._removed_tokens - tag
        return [max(0, rows - removed_since) for rows in counts]

    def _take_landed_copy(self) -> None:
        """If the copy in flight has reached the host, it becomes the bound's basis."""
        if self._copy_in_flight is not None and self._copy.landed():
            self._landed = (self._copy.host.tolist(), self._copy_in_flight)
            self._copy_in_flight = None

    def _set(self, counts: list[int]) -> None:
        """The counts are now `counts`, exactly (a copy in flight may predate the change)."""
        self._pending_added.clear()
        self._pending_removed.clear()
        self._rows.copy_(torch.tensor(counts, dtype=torch.int64))
        self._landed = (list(counts), self._removed_tokens)
        self._copy_in_flight = None

    def reset(self) -> None:
        self._set([0] * self.pool.layer_num)

    def matches_tree(self, evictable_tokens: torch.Tensor | None) -> tuple[bool, list[int], list[int]]:
        """Compare with the rows of `evictable_tokens` (a walk of the tree's unlocked nodes);
        on a mismatch, take the walked counts. Returns (matched, counted, walked)."""
        counted = self.per_layer()
        walked = (self.pool.rows_held(evictable_tokens).tolist() if evictable_tokens is not None
                  else [0] * self.pool.layer_num)
        if counted != walked:
            self._set(walked)
        return counted == walked, counted, walked
