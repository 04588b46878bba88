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

The counts live on the device and are updated without host syncs; the admission check reads
them with one. The idle check compares them with a walk of the tree (`matches_tree`).
"""

from __future__ import annotations

import torch

from sglang_kvc.pool import CompressedKVPool


class EvictableRows:
    def __init__(self, pool: CompressedKVPool) -> None:
        self.pool = pool
        self._rows = torch.zeros(pool.layer_num, dtype=torch.int64, device=pool.location.device)

    def add(self, tokens: torch.Tensor) -> None:
        """`tokens` became evictable (their node was inserted unlocked, or unlocked)."""
        if tokens.numel():
            self._rows += self.pool.rows_held(tokens)

    def remove(self, tokens: torch.Tensor) -> None:
        """`tokens` stop being evictable (their node was locked, or is being evicted: call
        before their rows are freed)."""
        if tokens.numel():
            self._rows -= self.pool.rows_held(tokens)

    def per_layer(self) -> list[int]:
        return self._rows.tolist()

    def reset(self) -> None:
        self._rows.zero_()

    def matches_tree(self, evictable_tokens: torch.Tensor | None) -> tuple[bool, list[int], list[int]]:
        """Compare with the rows of `evictable_tokens` (a walk of the tree's unlocked nodes);
        on a mismatch, take the walked counts. Returns (matched, counted, walked)."""
        counted = self.per_layer()
        walked = (self.pool.rows_held(evictable_tokens).tolist() if evictable_tokens is not None
                  else [0] * self.pool.layer_num)
        if counted != walked:
            self._rows.copy_(torch.tensor(walked, dtype=torch.int64))
        return counted == walked, counted, walked
