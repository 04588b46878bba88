"""A prompt keeps the same tokens, and decodes the same, however SGLang chunks its prefill.

With 16 requests at once and prompts just under the chunked-prefill size, nearly every pass
ends one prompt and starts the next with a few tokens, so a prompt is split into a small
first chunk (sharing a pass with another request's last chunk) and a large last chunk, or
the other way round. Through real SGLang objects (tests/sim.py), with keys, values and
queries a fixed function of (prompt, position, layer), such a split must leave each layer's
kept tokens (position and tier) and the decode output exactly as one whole-prompt pass does.
Configs shaped like qwen_12x_tuned (window 16, no guard) and qwen_8x_tuned (window 8, guard).
(Written while chasing a server-only loss of qwen_12x_tuned at kv 8K with 16 requests at once,
docs/results/tiny-serve-12x-8k-concurrency1-2026-12-01.md: these splits are ruled out.)
"""

from __future__ import annotations

import zlib

import pytest
import torch
from sim import Simulator

from sglang_kvc.config import config_from_dict
from sglang_kvc.engine import CompressedAttention
from sglang_kvc.pool import Tier, tier_of

NUM_LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 3, 2, 4, 64
MAX_LEN = 1024
PROMPT_LEN = 400


def config(window: int, guard_fraction: float):
    return config_from_dict({
        "sparsity": {"retain_ratio": 0.36, "budget": "uniform", "observation_window": window, "sink_tokens": 4,
                     "recent_window": 32, "pooling_kernel": 7, "min_prompt_len": 16},
        "quantization": {"key_bits": 4, "value_bits": 2, "group_size": 64, "guard_fraction": guard_fraction,
                         "guard_bits": 16, "decode_window": 16},
    })


LIKE_12X = config(window=16, guard_fraction=0.0)
LIKE_8X = config(window=8, guard_fraction=0.1)


class FixedTensorsSimulator(Simulator):
    """The Simulator with K/V/Q taken from per-prompt tensors drawn once (its own draws are
    fresh per pass, so two runs of one prompt could not be compared)."""

    def __post_init__(self):
        super().__post_init__()
        self.engine = CompressedAttention(self.pool, self.req_to_token_pool.req_to_token, attention_impl="torch")
        self.prompt_name: dict[str, str] = {}  # rid -> the name its tensors are drawn for
        self.decode_outputs: dict[str, list[torch.Tensor]] = {}

    def request(self, name: str, tokens: range, chunk_size: int = 1 << 30):
        sim = self.new_request(list(tokens), chunk_size=chunk_size)
        self.prompt_name[sim.rid] = name
        return sim

    @staticmethod
    def tensors(name: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{layer}".encode()))
        keys = torch.randn(MAX_LEN, KV_HEADS, HEAD_DIM, generator=generator)
        values = torch.randn(MAX_LEN, KV_HEADS, HEAD_DIM, generator=generator)
        queries = torch.randn(MAX_LEN, Q_HEADS, HEAD_DIM, generator=generator)
        # a few keys the last queries attend to strongly: the scores are not all near-ties
        late_query = queries[-50:].mean(0).reshape(KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM).mean(1)
        for position in (40 + 37 * layer, 120, 200 + 11 * layer):
            keys[position] += 3 * late_query
        return keys, values, queries

    def _forward(self, batch, loc):
        self.engine.begin(batch, loc)
        for layer in self.layers:
            parts = [[], [], []]
            for rid, seq_len, extend_len in zip(batch.rids, batch.seq_lens, batch.extend_lens):
                for part, tensor in zip(parts, self.tensors(self.prompt_name[rid], layer.layer_id)):
                    part.append(tensor[seq_len - extend_len : seq_len])
            keys, values, queries = (torch.cat(part) for part in parts)
            self.pool.set_kv_buffer(layer, loc, keys, values)
            if batch.is_decode:
                output = self.engine.decode(layer.layer_id, queries, self.head_dim**-0.5)
                for row, rid in enumerate(batch.rids):
                    self.decode_outputs.setdefault(rid, []).append(output[row].clone())
            else:
                self.engine.extend(layer.layer_id, queries, self.head_dim**-0.5, new_kv=(keys, values))

    def kept_tokens(self, sim) -> list[list[tuple[int, int]]]:
        """Per layer: (position, tier) of every token of the request the layer holds."""
        slots = self.req_to_token_pool.req_to_token[sim.req.req_pool_idx, : sim.req.kv_committed_len].long()
        kept = []
        for layer in range(self.num_layers):
            tiers = tier_of(self.pool.location[layer, slots]).tolist()
            kept.append([(position, tier) for position, tier in enumerate(tiers) if tier != int(Tier.EVICTED)])
        return kept


def new_simulator(compression) -> FixedTensorsSimulator:
    return FixedTensorsSimulator(logical_tokens=8192, num_layers=NUM_LAYERS, kv_heads=KV_HEADS, q_heads=Q_HEADS,
                                 head_dim=HEAD_DIM, context_len=MAX_LEN, max_requests=8, config=compression)


def decode_twice(sim: FixedTensorsSimulator, running: list) -> None:
    sim.decode_step(running)
    sim.decode_step(running)


def prompt_alone(compression):
    """P prefilled in one pass of its own, then two decode steps."""
    sim = new_simulator(compression)
    prompt = sim.request("P", range(1000, 1000 + PROMPT_LEN))
    sim.prefill(prompt)
    kept = sim.kept_tokens(prompt)
    decode_twice(sim, [prompt])
    return kept, sim.decode_outputs[prompt.rid]


def prompt_split(compression, first_chunk: int, next_request_joins: bool):
    """X prefilled in two chunks; P's first `first_chunk` tokens share X's last pass; P's rest
    comes in one chunk, sharing its pass with Y's first chunk if `next_request_joins`."""
    sim = new_simulator(compression)
    other = sim.request("X", range(5000, 5300), chunk_size=150)
    prompt = sim.request("P", range(1000, 1000 + PROMPT_LEN), chunk_size=first_chunk)
    next_request = sim.request("Y", range(9000, 9350), chunk_size=first_chunk + 7)
    assert sim.admit(other)
    sim.prefill_chunks([other])
    assert sim.admit(prompt)
    sim.prefill_chunks([other, prompt])
    assert other.prompt_done and not prompt.prompt_done
    prompt.chunk_size = 1 << 30
    running = [other, prompt]
    if next_request_joins:
        assert sim.admit(next_request)
        sim.prefill_chunks([prompt, next_request])
        next_request.chunk_size = 1 << 30
        sim.prefill_chunks([next_request])
        running.append(next_request)
    else:
        sim.prefill_chunks([prompt])
    assert prompt.prompt_done
    kept = sim.kept_tokens(prompt)
    decode_twice(sim, running)
    return kept, sim.decode_outputs[prompt.rid]


def prompt_with_short_last_chunk(compression, last_chunk: int):
    """P's first PROMPT_LEN - `last_chunk` tokens share X's last pass; its last chunk, shorter
    than the observation window for some values, is topped up from the chunk before."""
    sim = new_simulator(compression)
    other = sim.request("X", range(5000, 5300), chunk_size=290)
    prompt = sim.request("P", range(1000, 1000 + PROMPT_LEN), chunk_size=PROMPT_LEN - last_chunk)
    assert sim.admit(other)
    sim.prefill_chunks([other])
    assert sim.admit(prompt)
    sim.prefill_chunks([other, prompt])
    assert not prompt.prompt_done
    sim.prefill_chunks([prompt])
    assert prompt.prompt_done
    kept = sim.kept_tokens(prompt)
    decode_twice(sim, [other, prompt])
    return kept, sim.decode_outputs[prompt.rid]


def assert_same_as_alone(split, alone) -> None:
    (kept, outputs), (kept_alone, outputs_alone) = split, alone
    for layer in range(NUM_LAYERS):
        assert kept[layer] == kept_alone[layer], (layer, sorted(set(kept[layer]) ^ set(kept_alone[layer]))[:20])
    assert len(outputs) == len(outputs_alone) == 2 * NUM_LAYERS
    for output, output_alone in zip(outputs, outputs_alone):
        torch.testing.assert_close(output, output_alone, rtol=0, atol=0)


@pytest.mark.parametrize(("compression", "first_chunk", "next_request_joins"), [
    (LIKE_12X, 1, False), (LIKE_12X, 13, True), (LIKE_12X, 17, True), (LIKE_8X, 5, True), (LIKE_8X, 13, False),
])
def test_a_small_first_chunk_beside_another_requests_last_keeps_what_one_pass_keeps(
        compression, first_chunk, next_request_joins):
    assert_same_as_alone(prompt_split(compression, first_chunk, next_request_joins), prompt_alone(compression))


@pytest.mark.parametrize(("compression", "last_chunk"), [(LIKE_12X, 7), (LIKE_12X, 16), (LIKE_8X, 7)])
def test_a_short_last_chunk_keeps_what_one_pass_keeps(compression, last_chunk):
    assert_same_as_alone(prompt_with_short_last_chunk(compression, last_chunk), prompt_alone(compression))
