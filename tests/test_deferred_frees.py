"""Frees that return their rows once the device has counted them (sglang_kvc/deferred_frees.py),
with the pool, SGLang's allocator and radix cache (tests/sim.py). On the CPU the counts are
ready at once; `HeldFrees` keeps them pending, as a GPU still running the forward in flight
would, until the test lets the device catch up."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sim import Simulator, small_config
from test_pool_lifecycle import assert_fully_free, prompt, run_to_completion, serve

from sglang_kvc.deferred_frees import DeferredFrees
from sglang_kvc.patches import scheduler as hooks


class _CountingOnTheDevice:
    """An event the device has not reached yet; `synchronize` is the host waiting for it."""

    def __init__(self, frees: "HeldFrees"):
        self.frees = frees
        self.reached = False

    def query(self) -> bool:
        return self.reached

    def synchronize(self) -> None:
        self.frees.waits += 1
        self.reached = True


class HeldFrees(DeferredFrees):
    def __init__(self):
        super().__init__()
        self.events: list[_CountingOnTheDevice] = []
        self.waits = 0

    def push(self, counts, ordered_rows, staging_rows) -> None:
        super().push(counts, ordered_rows, staging_rows)
        self._pending[-1].done = event = _CountingOnTheDevice(self)
        self.events.append(event)

    def device_catches_up(self) -> None:
        for event in self.events:
            event.reached = True


def held_simulator(**kwargs) -> tuple[Simulator, HeldFrees]:
    sim = Simulator(**kwargs)
    sim.pool.deferred_frees = held = HeldFrees()
    sim.allocator.exact_below_headroom = 0  # wait only when the pending frees could be all the headroom
    return sim, held


def free_rows(sim: Simulator) -> list[int]:
    return [sim.pool.free_rows(layer) for layer in range(sim.num_layers)]


def test_a_free_forgets_the_tokens_at_once_and_returns_their_rows_when_counted():
    sim, held = held_simulator()
    serve(sim, sim.new_request(prompt(120), max_new_tokens=20))
    tokens = hooks.evictable_tokens(sim.tree)
    rows_held = sim.pool.rows_held(tokens).tolist()
    assert min(rows_held) > 0
    staging_before = sim.pool.staging_free.available()
    before, headroom = free_rows(sim), sim.pool.headroom_tokens()

    # Straight to the pool (the tree still lists them: this test never touches it again).
    sim.pool.free_tokens(tokens)
    assert int(sim.pool.location[:, tokens].count_nonzero()) == 0  # the ids can be handed out again now
    assert free_rows(sim) == before and sim.pool.headroom_tokens() == headroom and len(held) == 1
    held.device_catches_up()
    assert sim.pool.headroom_tokens() > headroom and len(held) == 0 and held.waits == 0
    assert free_rows(sim) == [b + r for b, r in zip(before, rows_held)]
    assert sim.pool.staging_free.available() == staging_before


def test_staged_tokens_give_back_their_staging_rows_when_counted():
    sim, held = held_simulator()
    request = sim.new_request(prompt(60), max_new_tokens=8)
    assert sim.admit(request)
    run_to_completion(sim, request, decode_steps=3)  # the decode tokens are still staged
    staged = sim.pool.staged_count
    tokens = sim.req_to_token_pool.req_to_token[request.req.req_pool_idx, : request.req.kv_committed_len]
    staged_tokens = int(sim.pool.staged_mask(tokens).sum())
    assert staged_tokens > 0
    staging_free = sim.pool.staging_free.available()
    sim.pool.free_tokens(tokens)
    assert sim.pool.staged_count == staged and sim.pool.staging_free.available() == staging_free
    assert int(sim.pool.staged_mask(tokens).sum()) == 0
    held.device_catches_up()
    sim.pool.return_freed_rows()
    assert sim.pool.staged_count == staged - staged_tokens
    assert sim.pool.staging_free.available() == staging_free + staged_tokens


def test_the_padding_id_in_a_free_changes_nothing():
    sim, held = held_simulator()
    serve(sim, sim.new_request(prompt(80), max_new_tokens=2))
    tokens = hooks.evictable_tokens(sim.tree)
    rows_held = sim.pool.rows_held(tokens).tolist()
    before = free_rows(sim)
    sim.pool.free_tokens(torch.cat((torch.zeros(3, dtype=tokens.dtype), tokens)))
    sim.pool.return_freed_rows(wait=True)
    assert free_rows(sim) == [b + r for b, r in zip(before, rows_held)]
    assert int(sim.pool.location[:, 0].count_nonzero()) == 0 and int(sim.pool.staging_row[0]) == 0


def test_radix_cache_eviction_counts_its_frees_at_once():
    """The tree evicts until `available_size` covers the need: its frees must count now."""
    sim, held = held_simulator()
    for index in range(3):
        serve(sim, sim.new_request(prompt(100, start=1000 * (index + 1)), max_new_tokens=2))
    headroom = sim.pool.headroom_tokens()
    sim.tree.evict(EvictParams(num_tokens=150))
    assert len(held) == 0 and held.waits > 0
    assert sim.pool.headroom_tokens() > headroom


def test_an_allocation_short_of_rows_waits_for_the_pending_frees():
    sim, held = held_simulator(logical_tokens=2048)
    sim.allocator.exact_below_headroom = -1  # never wait in available_size: leave it to alloc
    serve(sim, sim.new_request(prompt(150), max_new_tokens=2))
    tokens = hooks.evictable_tokens(sim.tree)
    sim.pool.free_tokens(tokens)  # rows pending, ids not back with the allocator (the tree has them)
    visible = sim.allocator.available_size()
    held_back = sim.pool.headroom_tokens()
    sim.pool.return_freed_rows(wait=True)
    true_headroom = sim.pool.headroom_tokens()
    assert true_headroom > held_back
    # Again, this time leaving the pending rows to the allocation that needs them.
    sim2, held2 = held_simulator(logical_tokens=2048)
    sim2.allocator.exact_below_headroom = -1
    serve(sim2, sim2.new_request(prompt(150), max_new_tokens=2))
    sim2.pool.free_tokens(hooks.evictable_tokens(sim2.tree))
    assert sim2.allocator.available_size() == visible
    need = min(true_headroom, sim2.allocator.logical_available_size())
    assert need > visible
    assert sim2.allocator.alloc(need) is not None
    assert held2.waits > 0 and len(held2) == 0


def test_near_the_limit_available_size_counts_the_pending_frees():
    sim, held = held_simulator()
    serve(sim, sim.new_request(prompt(100), max_new_tokens=2))
    sim.pool.free_tokens(hooks.evictable_tokens(sim.tree))
    sim.allocator.exact_below_headroom = sim.pool.headroom_tokens() + 1  # "nearly full"
    sim.allocator.available_size()
    assert held.waits > 0 and len(held) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operations=st.lists(
        st.tuples(
            st.sampled_from(["new", "prefill", "decode", "finish", "retract", "evict", "device"]),
            st.integers(0, 2**16),
        ),
        min_size=5,
        max_size=30,
    ),
    guard_bits=st.sampled_from([8, 16]),
)
def test_random_lifecycles_with_frees_counted_late_keep_every_invariant(operations, guard_bits):
    """Retracted requests free their own tokens (staged, low-bit, guard), chunked prompts
    the ids the tree already had, while the device is still counting earlier frees; ids
    are handed out again before their rows are back. Invariants are checked whenever the
    device has caught up."""
    sim, held = held_simulator(logical_tokens=1500, config=small_config(guard_bits=guard_bits))
    prefixes = [prompt(40, start=10), prompt(40, start=20_000)]
    for op, draw in operations:
        if op == "device":
            held.device_catches_up()
            sim.pool.return_freed_rows()
        else:
            sim.random_step(op, draw, prefixes)
        if not held:
            sim.check()
    for request in list(sim.live):
        sim.finish(request)
    held.device_catches_up()
    sim.check()
    sim.evict_all()
    assert_fully_free(sim)


def test_ids_freed_by_a_retraction_serve_a_new_request_before_their_rows_are_back():
    sim, held = held_simulator(logical_tokens=1500)
    first = sim.new_request(prompt(90, start=10), max_new_tokens=6, chunk_size=40)
    assert sim.admit(first)
    run_to_completion(sim, first, decode_steps=4)
    freed = set(sim.req_to_token_pool.req_to_token[first.req.req_pool_idx, : first.req.kv_committed_len].tolist())
    sim.retract(first)  # frees its prompt and decode tokens: low-bit, guard and staged rows
    assert len(held) > 0 and held.waits == 0
    # SGLang's allocator appends freed ids to its free list; order it so that the lowest ids,
    # the ones just freed, are handed out first.
    sim.allocator.free_pages = torch.sort(sim.allocator.free_pages).values
    second = sim.new_request(prompt(90, start=5000), max_new_tokens=4, chunk_size=40)
    assert sim.admit(second)
    while not second.prompt_done:
        sim.prefill_chunk(second)  # takes ids (and rows) while the first's rows are still counted
    assert len(held) > 0 and held.waits == 0
    taken = sim.req_to_token_pool.req_to_token[second.req.req_pool_idx, : second.req.kv_committed_len].tolist()
    assert freed & set(taken)
    held.device_catches_up()
    sim.pool.return_freed_rows()
    sim.check()
    run_to_completion(sim, second)
    sim.finish(second)
    sim.check()
    sim.evict_all()
    assert_fully_free(sim)
