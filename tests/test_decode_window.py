"""The decode window's seals: from the host's bookkeeping (no device read) and, for a
request slot the host does not know, from the staging map; both move the same tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim import Simulator, small_config

from sglang_kvc.decode_window import UNKNOWN, DecodeWindow
from sglang_kvc.pool import CompressedKVPool, Tier, tier_of


def prompt(length: int, start: int = 100) -> list[int]:
    return list(range(start, start + length))


def scenario(window: int, joins: int, forget_slots: bool = False, after_step=None, steps: int = 20) -> Simulator:
    """Two prompts, the second joining the decode batch at step `joins`; `after_step(sim,
    batch)` runs after every decode step. With `forget_slots` the engine loses its host
    bookkeeping before every decode step (so every seal reads the staging map)."""
    sim = Simulator(config=small_config(decode_window=window))
    first = sim.new_request(prompt(40), max_new_tokens=30)
    second = sim.new_request(prompt(27, 500), max_new_tokens=30)
    sim.prefill(first)
    sim.prefill(second)
    batch = [first]
    for step in range(steps):
        if step == joins:
            batch.append(second)
        if forget_slots:
            sim.engine.decode_window.staged_from = [UNKNOWN] * len(sim.engine.decode_window.staged_from)
        sim.decode_step(batch)
        sim.check()
        if after_step is not None:
            after_step(sim, batch)
    return sim


@given(window=st.sampled_from([0, 1, 5, 6]), joins=st.integers(0, 7))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_tokens_leave_staging_in_batches_within_the_window(window, joins):
    """Sealing runs every max(1, window // 2) steps: a decode token is bf16 for at most
    `decode_window` steps after its own, no request holds more than window + 1 staged decode
    tokens (what the planner sizes staging for), and a request that joins the decode batch
    mid-interval is covered too."""

    def staged_within_the_window(sim, batch):
        for request in batch:
            req = request.req
            tokens = sim.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_committed_len].long()
            staged = sim.pool.staged_mask(tokens).nonzero().squeeze(1)
            assert staged.numel() <= window + 1
            assert (staged >= len(req.origin_input_ids)).all()  # prompt tokens were placed at prefill
            # The newest staged token is this step's; the oldest at most `window` steps older.
            newest = req.kv_committed_len - 1
            assert staged.numel() and int(staged.max()) == newest
            assert int(staged.min()) >= newest - window

    sim = scenario(window, joins, after_step=staged_within_the_window, steps=24)
    for request in list(sim.live):
        sim.finish(request)
    assert sim.pool.staged_count == 0


@given(window=st.sampled_from([0, 1, 2, 5, 6]), joins=st.integers(0, 9))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_host_bookkeeping_seals_what_the_staging_map_would(window, joins):
    by_host = scenario(window, joins, forget_slots=False)
    by_map = scenario(window, joins, forget_slots=True)
    # The same tokens in the same tiers holding the same K / V (rows may be numbered
    # differently: the map path seals in token-id order).
    assert torch.equal(tier_of(by_host.pool.location), tier_of(by_map.pool.location))
    assert torch.equal(by_host.pool.staging_row > 0, by_map.pool.staging_row > 0)
    tokens = torch.arange(1, by_host.logical_tokens + 1)
    for layer in range(by_host.num_layers):
        for ours, theirs in zip(by_host.pool.gather(layer, tokens, torch.float32),
                                by_map.pool.gather(layer, tokens, torch.float32)):
            assert torch.equal(ours, theirs)
    assert by_host.pool.staged_count == by_map.pool.staged_count
    for layer in range(by_host.num_layers):
        assert by_host.pool.lowbit_free[layer].available() == by_map.pool.lowbit_free[layer].available()


def test_a_known_batch_never_reads_the_staging_map(monkeypatch):
    def no_map_read(self, slots, seq_lens):
        raise AssertionError("the seal read the staging map although the host knew every slot")

    monkeypatch.setattr(DecodeWindow, "_seal_by_map", no_map_read)
    sim = scenario(window=2, joins=3)
    assert sim.engine.decode_window.steps == 20
    staged_before = sim.pool.staged_count
    monkeypatch.setattr(CompressedKVPool, "seal", lambda self, tokens: no_map_read(self, None, None))
    for request in list(sim.live):
        slot = request.req.req_pool_idx
        sim.finish(request)  # the release seal: the same host bookkeeping
        sim.check()
        assert sim.engine.decode_window.staged_from[slot] == UNKNOWN
    assert staged_before > 0 and sim.pool.staged_count == 0


def test_a_release_seals_what_the_staging_map_would():
    """Finishing requests at any point of their decode window (and one that had decoded
    nothing): the host's release seal leaves the pool as the map's does."""
    def finish_all(forget: bool) -> Simulator:
        sim = scenario(window=5, joins=2, steps=7)
        short = sim.new_request(prompt(19, 900), max_new_tokens=1)
        sim.prefill(short)  # finished at prefill: no decode token staged
        for request in list(sim.live):
            if forget:
                sim.engine.decode_window.staged_from[request.req.req_pool_idx] = UNKNOWN
            sim.finish(request)
            sim.check()
        return sim

    by_host, by_map = finish_all(forget=False), finish_all(forget=True)
    assert by_host.pool.staged_count == by_map.pool.staged_count == 0
    assert torch.equal(tier_of(by_host.pool.location), tier_of(by_map.pool.location))
    for layer in range(by_host.num_layers):
        assert by_host.pool.lowbit_free[layer].available() == by_map.pool.lowbit_free[layer].available()


def test_requests_finishing_together_are_sealed_in_one_batch_as_one_by_one(monkeypatch):
    """Requests released in one free group (as SGLang releases those finishing in one step)
    are sealed by one `seal_staged` at the group's end, before its frees, and leave the pool
    as releasing them one by one does. The third repeats the first's prompt and output, so
    the radix cache frees its decode tokens as duplicates inside the group: still staged
    when the group's seal runs, freed after it."""
    def finish(together: bool) -> Simulator:
        sim = scenario(window=5, joins=2, steps=7)
        first, second = list(sim.live)
        twin = sim.new_request(prompt(40), max_new_tokens=30)
        sim.prefill(twin)  # the first's prompt, from the tree
        for _ in range(len(first.req.output_ids)):
            sim.decode_step([twin])
        twin.req.output_ids[:] = first.req.output_ids
        twin_decode_tokens = sim.req_to_token_pool.req_to_token[twin.req.req_pool_idx, 40:twin.req.kv_committed_len].long()
        assert sim.pool.staged_mask(twin_decode_tokens).any()
        requests = [first, second, twin]
        if together:
            seals = []
            original = CompressedKVPool.seal_staged
            monkeypatch.setattr(CompressedKVPool, "seal_staged",
                                lambda self, tokens: (seals.append(tokens.numel()), original(self, tokens)))
            sim.finish_together(requests)
            monkeypatch.undo()
            assert len(seals) == 1 and seals[0] > 0
        else:
            for request in requests:
                sim.finish(request)
        sim.check()
        assert (tier_of(sim.pool.location[:, twin_decode_tokens]) == Tier.EMPTY).all()  # freed as duplicates
        return sim

    together, one_by_one = finish(True), finish(False)
    assert together.pool.staged_count == one_by_one.pool.staged_count == 0
    assert torch.equal(tier_of(together.pool.location), tier_of(one_by_one.pool.location))
    tokens = torch.arange(1, together.logical_tokens + 1)
    for layer in range(together.num_layers):
        assert together.pool.lowbit_free[layer].available() == one_by_one.pool.lowbit_free[layer].available()
        for ours, theirs in zip(together.pool.gather(layer, tokens, torch.float32),
                                one_by_one.pool.gather(layer, tokens, torch.float32)):
            assert torch.equal(ours, theirs)


def test_a_prompt_chunk_forgets_what_the_slot_held_before():
    """A request that left its slot without the release seal (e.g. retracted) leaves its
    bookkeeping behind; the next request's first chunk clears it, so an abort before its last
    chunk seals from the staging map (its chunks are staged from position 0)."""
    sim = Simulator()
    window = sim.engine.decode_window
    window.staged_from = [7] * len(window.staged_from)  # stale in every slot
    chunked = sim.new_request(prompt(90, 600), max_new_tokens=3, chunk_size=32)
    assert sim.admit(chunked)
    sim.prefill_chunk(chunked)
    assert not chunked.prompt_done and sim.pool.staged_count == 32
    assert window.staged_from[chunked.req.req_pool_idx] == UNKNOWN
    sim.abort(chunked)
    sim.check()
    assert sim.pool.staged_count == 0


def test_a_slot_the_host_does_not_know_falls_back_to_the_map():
    sim = Simulator()
    request = sim.new_request(prompt(40), max_new_tokens=12)
    sim.prefill(request)
    slot = request.req.req_pool_idx
    sim.engine.decode_window.staged_from[slot] = UNKNOWN  # e.g. a prefill this engine did not see
    for _ in range(12):
        sim.decode_step([request])
        sim.check()
    window = sim.config.quantization.decode_window
    assert sim.pool.staged_count <= window + 1
    assert sim.engine.decode_window.staged_from[slot] == UNKNOWN  # stays on the map path


@pytest.mark.parametrize("window", [0, 4])
def test_prompt_done_then_seals_start_at_the_first_decode_token(window):
    sim = Simulator(config=small_config(decode_window=window))
    request = sim.new_request(prompt(33), max_new_tokens=10)
    sim.prefill(request)
    assert sim.engine.decode_window.staged_from[request.req.req_pool_idx] == 33
