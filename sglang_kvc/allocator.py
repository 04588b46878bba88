"""Logical token-id allocator whose free count respects the compressed pool's rows.

Token ids are handed out exactly as SGLang's `TokenToKVPoolAllocator` does; the
physical rows behind them belong to `CompressedKVPool`. `available_size()` is the
smaller of the free ids and the pool's row headroom, so SGLang's scheduler never
admits what the tiers cannot store, and frees reach the pool so rows return in every
layer.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from sglang_kvc.pool import CompressedKVPool


class CompressedTokenAllocator(TokenToKVPoolAllocator):
    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: CompressedKVPool):
        self.report_logical_size = False
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
        return max(0, min(logical, self.pool.headroom_tokens()))

    def alloc(self, need_size: int):
        if need_size > self.available_size():
            return None
        return super().alloc(need_size)

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if self.is_not_in_free_group:
            self.pool.free_tokens(free_index)
        super().free(free_index)

    def clear(self):
        super().clear()
        self.pool.clear_state()
