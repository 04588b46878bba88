"""Decode tokens leaving the decode window: from staging (bf16) to the low-bit tier.

Every decode token is written to staging and attended at full precision while it is in the
decode window. Before every `interval`-th (k = max(1, decode_window // 2)) decode step, each
request's staged decode tokens at positions <= seq_len - 3 - decode_window + k (seq_len
counting the step's new token) move to the low-bit tier in every layer. The step then
attends to between decode_window - k + 1 and decode_window earlier decode tokens in bf16
(with k = 1, always decode_window), and a request never holds more than decode_window + 1
staged decode tokens, which is what the planner sizes staging for. Every k steps instead of
every step amortizes the launches.

Which tokens those are is known on the host: per request slot, the first position of its
decode tokens still staged (its prompt's length when its prefill ends, then each seal's
bound). So a seal pops a host-known count of rows from the free lists and needs no device
sync. A sync here would wait for the previous decode step on the GPU and delay this step's
launch, a bubble the overlap scheduler cannot hide (serving run 17: three syncs, 5.6 ms per
seal). The same bookkeeping seals a finished request's last staged decode tokens
(`seal_released`, from `patches.scheduler.seal_released_request`). A slot whose prompt this
engine did not see finish (a request aborted in prefill) falls back to reading the staging
map (`pool.seal`, which syncs).

Requests finishing in one step are released one by one inside SGLang's free group (the
allocator's `free_group_begin` / `free_group_end` around a batch result); their seals wait
for the group's end and run as one `seal_staged` over all of them, before the group's frees
(`begin_release_group` / `end_release_group`): 64 requests finishing together dispatch 148
operators instead of 5,376 (docs/results/host-ops-2026-11-30-d.md). Nothing reads a token's
tier in between: the radix cache's insert counts a staged token's rows as the row it will
take when sealed, and the group's frees (a cached duplicate's tokens) come after the seal.
"""

from __future__ import annotations

import torch

from sglang_kvc.device_copy import to_device
from sglang_kvc.pool import CompressedKVPool

UNKNOWN = -1


class DecodeWindow:
    def __init__(self, pool: CompressedKVPool, req_to_token: torch.Tensor, decode_window: int) -> None:
        self.pool = pool
        self.req_to_token = req_to_token
        self.window = decode_window
        self.interval = max(1, decode_window // 2)
        self.steps = 0
        # Per request slot: the first position of its decode tokens still staged.
        self.staged_from = [UNKNOWN] * req_to_token.shape[0]
        # While a release group is open: the released requests' staged decode tokens, sealed
        # together when it closes (None: seal at once).
        self._release_group: list[torch.Tensor] | None = None
        pool.decode_window = self  # for the scheduler's release hook, which sees the pool only

    def prompt_done(self, slot: int, prompt_len: int) -> None:
        """The request in `slot` finished its prompt: its decode tokens start at `prompt_len`."""
        self.staged_from[slot] = prompt_len

    def prompt_chunk(self, slot: int) -> None:
        """The request in `slot` prefilled a chunk that does not finish its prompt: nothing is
        known of it (a request that left the slot without `seal_released` may have left its
        value behind)."""
        self.staged_from[slot] = UNKNOWN

    def seal_released(self, slot: int, committed: int) -> bool:
        """The request in `slot` finished with `committed` tokens of KV: seal its decode tokens
        still staged (every position from `staged_from` on: each was staged by the decode pass
        that wrote it, and SGLang counts a token as committed once its pass is issued) and
        forget the slot. False, sealing nothing, if the host does not know the slot."""
        start, self.staged_from[slot] = self.staged_from[slot], UNKNOWN
        if start == UNKNOWN:
            return False
        if committed > start:
            # Read the slot's token ids now: SGLang frees the slot when the release ends.
            tokens = self.req_to_token[slot, start:committed].to(torch.int64)
            if self._release_group is None:
                self.pool.seal_staged(tokens)
            else:
                self._release_group.append(tokens)
        return True

    def begin_release_group(self) -> None:
        """Requests released from now on have their decode tokens sealed at `end_release_group`."""
        self._release_group = []

    def end_release_group(self) -> None:
        """Seal the decode tokens of every request released since `begin_release_group`, as one batch."""
        group, self._release_group = self._release_group, None
        if group:
            self.pool.seal_staged(torch.cat(group))

    def due(self) -> bool:
        """Counts decode steps; True every `interval`-th."""
        self.steps += 1
        return self.steps % self.interval == 0

    def seal(self, slots: list[int] | None, seq_lens: list[int] | None,
             slots_device: torch.Tensor | None = None, seq_lens_device: torch.Tensor | None = None) -> None:
        """Before a decode step whose requests are `slots` with sequences (new token included)
        `seq_lens` long, before its new tokens are staged: move the tokens due. Host lists
        when the caller has them; otherwise (or for a slot the host does not know) the device
        tensors and the staging map."""
        if slots is not None and seq_lens is not None and all(self.staged_from[s] != UNKNOWN for s in slots):
            self._seal_known(slots, seq_lens)
            return
        device = self.pool.location.device
        if slots_device is None:
            slots_device, seq_lens_device = (to_device(values, torch.int64, device) for values in (slots, seq_lens))
        self._seal_by_map(slots_device.to(torch.int64), seq_lens_device.to(torch.int64))
        if slots is not None and seq_lens is not None:
            for slot, seq_len in zip(slots, seq_lens):
                if self.staged_from[slot] != UNKNOWN:
                    self.staged_from[slot] = max(self.staged_from[slot], self._bound(seq_len))

    def _bound(self, seq_len: int) -> int:
        """Positions below this are due (exclusive bound)."""
        return seq_len - 2 - self.window + self.interval

    def _seal_known(self, slots: list[int], seq_lens: list[int]) -> None:
        request_slots, positions = [], []
        for slot, seq_len in zip(slots, seq_lens):
            start, end = self.staged_from[slot], self._bound(seq_len)
            if end > start:
                request_slots += [slot] * (end - start)
                positions += range(start, end)
                self.staged_from[slot] = end
        if not positions:
            return
        device = self.pool.location.device
        tokens = self.req_to_token[to_device(request_slots, torch.int64, device), to_device(positions, torch.int64, device)]
        self.pool.seal_staged(tokens.to(torch.int64))

    def _seal_by_map(self, slots: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """The 2k positions up to the bound cover the k due now and the k of the previous seal
        (a request that joined the batch in between); prompt tokens among them were placed
        at prefill, and `pool.seal` skips what is not staged."""
        offsets = torch.arange(2 * self.interval, device=seq_lens.device)
        positions = (seq_lens - 2 - self.window - self.interval)[:, None] + offsets[None, :]
        due = positions >= 0
        rows = slots[:, None].expand_as(positions)
        self.pool.seal(self.req_to_token[rows[due], positions[due]].to(torch.int64))
