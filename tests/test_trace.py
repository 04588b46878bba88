"""The debugging trace (sglang_kvc/trace.py): off unless SGLANG_KVC_TRACE names a file; on,
one line per request at the end of its prompt and at its release, through real SGLang
objects (tests/sim.py), whose per-layer counts agree with the pool."""

from __future__ import annotations

import json

from sim import Simulator

from sglang_kvc.pool import Tier, tier_of
from sglang_kvc.trace import ENV


def test_no_trace_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    sim = Simulator()
    request = sim.new_request(list(range(100, 160)), max_new_tokens=2, chunk_size=25)
    sim.prefill(request)
    sim.finish(request)
    assert list(tmp_path.iterdir()) == []


def test_trace_lines_agree_with_the_pool(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(ENV, str(path))
    sim = Simulator()
    request = sim.new_request(list(range(100, 160)), max_new_tokens=3, chunk_size=25)
    sim.prefill(request)
    sim.decode_step([request])
    slot = request.req.req_pool_idx
    tokens = sim.req_to_token_pool.req_to_token[slot, :61].long()
    held_now = [int(((tier_of(sim.pool.location[layer, tokens]) >= Tier.STAGING)
                     & (tier_of(sim.pool.location[layer, tokens]) <= Tier.GUARD)).sum())
                for layer in range(sim.num_layers)]
    sim.finish(request)

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["rid"], line["event"], line["seq_len"]) for line in lines] == [
        (request.rid, "prompt", 60), (request.rid, "release", 61)]
    prompt, release = lines
    for layer, state in enumerate(prompt["layers"]):
        assert sum(state["tiers"].values()) == 60
        assert state["tiers"]["staging"] == 0  # compressed: nothing of the prompt left in staging
        assert 0 < state["tiers"]["lowbit"] + state["tiers"]["guard"] < 60  # SMALL_CONFIG evicts
        assert state["k_abs"] > 0 and state["v_abs"] > 0
    # At release: the prompt as compressed plus the decode token, staged (the decode window).
    assert [sum(state["tiers"][t] for t in ("staging", "lowbit", "guard")) for state in release["layers"]] == held_now
    assert all(state["tiers"]["staging"] == 1 for state in release["layers"])
    hashes = [[state["positions_hash"] for state in line["layers"]] for line in (prompt, release)]
    assert hashes[0] != hashes[1]


def test_trace_only_the_rids_asked_for(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(ENV, str(path))
    sim = Simulator()
    first, second = (sim.new_request(list(range(start, start + 40)), max_new_tokens=2) for start in (100, 300))
    monkeypatch.setenv("SGLANG_KVC_TRACE_RIDS", f"x,{second.rid}")
    for request in (first, second):
        sim.prefill(request)
        sim.finish(request)
    assert {json.loads(line)["rid"] for line in path.read_text().splitlines()} == {second.rid}
