"""Which prompt queries score a prompt in `sparsity.scoring: context` mode.

Queries are sampled across the whole prompt at a power-of-two stride, at most
`2 * observation_window` of them: the stride is the smallest power of two for which the
prompt's positions that are multiples of it number at most 2W, and the sampled queries are
the ones at those positions. Multiples of 2s are a subset of the multiples of s, and the
number of multiples of s among positions start..M-1 only grows with M, so the set can be
built chunk by chunk without keeping every query (the SGLang engine sees a prompt in chunks):

    sampler = StridedQuerySampler(window)
    for chunk in chunks:                      # consecutive positions
        sampler.add(chunk_queries, chunk_positions)
    sampler.queries(), sampler.positions()    # == context_query_positions(start, end, window)

`add` keeps the chunk's queries at multiples of the current stride and, while more than 2W
are held, doubles the stride and drops those no longer on it. Whatever the chunking, the
sampler ends where `context_query_positions` (the prompt in one piece) says; the stride only
depends on the prompt's length, never on its tokens.

Prefix safety is approximate: which positions before P are sampled depends on the length of
what follows P (appending tokens can double the stride and drop half of them, never add
one); see `docs/design.md`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _multiples(stride: int, start: int, end: int) -> int:
    """How many multiples of `stride` lie in [start, end)."""
    return max(0, -(-end // stride) - -(-start // stride))


def context_query_stride(start: int, end: int, window: int) -> int:
    """The smallest power of two with at most `2 * window` multiples in [start, end)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if start < 0 or end < start:
        raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
    stride = 1
    while _multiples(stride, start, end) > 2 * window:
        stride *= 2
    return stride


def context_query_positions(start: int, end: int, window: int) -> range:
    """The sampled query positions of a prompt whose (uncached) positions are start..end-1,
    seen in one piece: the multiples of `context_query_stride(start, end, window)`.
    For a whole prompt of N tokens: `context_query_positions(0, N, window)`."""
    stride = context_query_stride(start, end, window)
    return range(-(-start // stride) * stride, end, stride)


class StridedQuerySampler:
    """The context-mode queries of one prompt (one layer), accumulated chunk by chunk.

    `add(queries, positions)`: `queries` [T, ...] (positions along dim 0), `positions` the
    T consecutive positions of those queries (a `range`, a sequence or a 1-D tensor),
    continuing where the previous call ended. Only host integers decide what is kept (a
    `range` costs no device sync); the held queries are copies, not views of the chunk."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.capacity = 2 * window
        self.stride = 1
        self._start: int | None = None  # first position ever added
        self._end: int | None = None  # one past the last position added
        self._first = 0  # position of the first held query (held: _first, _first + stride, ...)
        self._queries: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self._queries is None else self._queries.shape[0]

    @staticmethod
    def _as_range(positions: range | Sequence[int] | torch.Tensor, count: int) -> range:
        if isinstance(positions, range):
            span = positions
        else:
            if isinstance(positions, torch.Tensor) and positions.dim() != 1:
                raise ValueError(f"positions must be 1-D, got shape {tuple(positions.shape)}")
            values = positions.tolist() if isinstance(positions, torch.Tensor) else list(positions)
            span = range(values[0], values[0] + len(values)) if values else range(0)
            if list(span) != values:
                raise ValueError("positions must be consecutive and increasing")
        if span.step != 1:
            raise ValueError(f"positions must be consecutive, got {span}")
        if len(span) != count:
            raise ValueError(f"{count} queries but {len(span)} positions")
        return span

    def add(self, queries: torch.Tensor, positions: range | Sequence[int] | torch.Tensor) -> None:
        span = self._as_range(positions, queries.shape[0])
        if len(span) == 0:
            return
        if self._end is not None and span.start != self._end:
            raise ValueError(f"positions must continue at {self._end}, got {span.start}")
        if span.start < 0:
            raise ValueError(f"positions must be >= 0, got {span.start}")
        if self._start is None:
            self._start = span.start
        self._end = span.stop
        # The final stride of this call: doubling while too many held is the same as taking the
        # smallest power of two (>= the current one) with at most `capacity` multiples seen.
        stride = self.stride
        while _multiples(stride, self._start, self._end) > self.capacity:
            stride *= 2
        held = self._queries
        if held is not None and stride != self.stride:
            # Held positions are _first + k * old stride; keep the multiples of the new one.
            step = stride // self.stride
            offset = next(k for k in range(step) if (self._first + k * self.stride) % stride == 0)
            held = held[offset::step]
            self._first += offset * self.stride
        self.stride = stride
        first_new = -(-span.start // stride) * stride
        new = queries[first_new - span.start :: stride]
        if held is None or held.shape[0] == 0:
            self._first = first_new
            self._queries = new.clone()
        else:
            self._queries = torch.cat((held, new))

    def queries(self) -> torch.Tensor | None:
        """[K, ...] the held queries in position order (None before the first add)."""
        return self._queries

    def positions(self) -> torch.Tensor:
        """[K] int64 positions of the held queries (on their device)."""
        device = self._queries.device if self._queries is not None else None
        return torch.arange(self._first, self._first + len(self) * self.stride, self.stride, dtype=torch.int64,
                            device=device)[: len(self)]
