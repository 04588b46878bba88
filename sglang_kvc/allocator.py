"""Logical token-id allocator whose free count respects the compressed pool's rows.

Token ids are handed out exactly as SGLang's `TokenToKVPoolAllocator` does; the
physical rows behind them belong to `CompressedKVPool`. `available_size()` is the
smaller of the free ids and the pool's row headroom, so SGLang's scheduler never
admits what the tiers cannot store, and frees reach the pool so rows return in every
layer.
"""

from __future__ import annotations

import contextlib

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from sglang_kvc.evictable_rows import EvictableRows
from sglang_kvc.pool import CompressedKVPool


def compressed_allocator_of(obj) -> "CompressedTokenAllocator | None":
    """The compressed allocator of a scheduler, radix cache or prefill adder (None if stock)."""
    allocator = getattr(obj, "token_to_kv_pool_allocator", None)
    return allocator if isinstance(allocator, CompressedTokenAllocator) else None


class CompressedTokenAllocator(TokenToKVPoolAllocator):
    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: CompressedKVPool):
        self.report_logical_size = False
        # Below this much row headroom (in logical tokens), or below the tokens of the frees
        # still being counted if those are more, `available_size` waits for the count: near the
        # limit, an admission or a decode step's retraction check could turn on those rows.
        self.exact_below_headroom = 4096
        # Rows held by the radix cache's unlocked nodes (patches.radix_cache keeps it current).
        self.evictable_rows = EvictableRows(kvcache)
        self._evicting_from_tree = False
        # Tokens freed through `free_segment` (host count): the radix cache frees a request's
        # tokens that way when it finds their content cached already (patches.radix_cache).
        self.segment_tokens_freed = 0
        super().__init__(size, dtype, device, kvcache, need_sort=False)

    @property
    def pool(self) -> CompressedKVPool:
        return self._kvcache

    def logical_available_size(self) -> int:
        return super().available_size()

    def available_size(self) -> int:
        logical = super().available_size()
        if self.report_logical_size:
            # SGLang's idle leak check balances logical ids (available + cached == total);
            # patches.scheduler turns this on around it and checks the rows separately.
            return logical
        headroom = self.pool.headroom_tokens()
        pending = self.pool.deferred_frees
        if pending and headroom < max(self.exact_below_headroom, pending.pending_tokens()):
            # Nearly full: whether the next request fits, or a decode step needs retraction,
            # may turn on rows still being counted, so count them now (a device sync).
            self.pool.return_freed_rows(wait=True)
            headroom = self.pool.headroom_tokens()
        return max(0, min(logical, headroom))

    def alloc(self, need_size: int):
        if need_size > self.available_size():
            if not self.pool.deferred_frees:
                return None
            self.pool.return_freed_rows(wait=True)
            if need_size > self.available_size():
                return None
        return super().alloc(need_size)

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if self.is_not_in_free_group:
            # The radix cache evicts until `available_size` covers its need, so what it frees
            # must count at once; other frees return their rows without a host sync.
            self.pool.free_tokens(free_index, wait=self._evicting_from_tree)
        super().free(free_index)

    def free_group_begin(self):
        super().free_group_begin()
        if self.pool.decode_window is not None:
            self.pool.decode_window.begin_release_group()

    def free_group_end(self):
        # The released requests' seals first (one batch), then the group's frees: the order of
        # releasing each request at once, so a freed token is never one still to be sealed.
        if self.pool.decode_window is not None:
            self.pool.decode_window.end_release_group()
        super().free_group_end()

    @contextlib.contextmanager
    def evicting_from_tree(self):
        """While the radix cache evicts: what it frees are unlocked nodes' tokens."""
        self._evicting_from_tree = True
        try:
            yield
        finally:
            self._evicting_from_tree = False

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int):
        # Counted off here, not in `free`: inside a free group the rows go only at its end.
        if self._evicting_from_tree:
            self.evictable_rows.remove_before_free(free_index)
        self.segment_tokens_freed += free_index.numel()
        super().free_segment(free_index, start_pos=start_pos)

    def clear(self):
        super().clear()
        self.pool.clear_state()
        self.evictable_rows.reset()
