"""The kernels wired into the engine: `CompressedAttention(attention_impl="triton")`
(decode kernels, window-score kernel, SGLang's extend kernel for prefill) against its
torch reference path, driven through real SGLang objects by the scheduler
simulator (tests/sim.py); `PackedStore.write` on CUDA; and a smoke run of
eval/bench_kernels.py so that the GPU benchmark script does not rot.

The simulator's pool lives on the CPU, so its Triton path runs only in the interpreter
(the default here, see conftest.py); with TRITON_INTERPRET=0 those tests skip."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from sim import SMALL_CONFIG, Simulator

from sglang_kvc.config import config_from_dict
from sglang_kvc.engine import CompressedAttention, DecodeKernel, decode_kernel, decode_num_splits
from sglang_kvc.kernels import gather_rows
from sglang_kvc.pool import Tier, tier_of
from sglang_kvc.quant import PackedFormat, quantize
from sglang_kvc.stores import PackedStore

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # conftest.py sets it first
REPO = Path(__file__).resolve().parents[2]
# decode_window (2) + 2: before the last step the first decode token leaves the window for low-bit.
DECODE_STEPS = 4
# Both paths read the same fp32 values (codes dequantize as code * scale + minimum in
# fp32 in both; bf16 rows are exact in fp32) and the interpreter computes the kernel's
# dots in fp32, so outputs differ only by summation order over < 64 tokens and 32 dims:
# ~1e-7 relative, observed <= 6e-7 on outputs of magnitude ~1 (values are N(0, 1)).
# 2e-5 leaves a 30x margin and still catches a dropped, duplicated or misread token.
DECODE_ATOL = 2e-5

needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="the simulator's pool is on the CPU: its Triton path runs only in the interpreter"
)
# The interpreter turns runtime loop bounds into Python ints through a conversion numpy
# deprecates (as in test_decode_attention_kernel.py).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


class RecordingAttention(CompressedAttention):
    """Keeps every extend and decode output (the simulator drops them); optionally decodes
    with a logit soft-cap, which the simulator never passes."""

    def __init__(self, *args, logit_cap: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.logit_cap = logit_cap
        # tf32 dots, which the interpreter computes in fp32, so that DECODE_ATOL can stay
        # tight; the engine's default ("auto": fp16 operands on packed rows) differs only in
        # that constant, and the kernel tests check it against the reference.
        self.decode_kernel = dataclasses.replace(self.decode_kernel, dot_precision="tf32")
        self.decode_outputs: list[torch.Tensor] = []
        self.extend_outputs: list[torch.Tensor] = []

    def extend(self, layer_id, q, scaling, logit_cap=0.0, new_kv=None):
        out = super().extend(layer_id, q, scaling, logit_cap, new_kv)
        self.extend_outputs.append(out.clone())
        return out

    def decode(self, layer_id, q, scaling, logit_cap=0.0):
        out = super().decode(layer_id, q, scaling, logit_cap or self.logit_cap)
        self.decode_outputs.append(out.clone())
        return out


def prompt(length: int, start: int) -> list[int]:
    return list(range(start, start + length))


def simulate(
    attention_impl: str, q_heads: int, guard_bits: int, seed: int, logit_cap: float = 0.0, captured: bool = False,
    key_transform: str = SMALL_CONFIG["quantization"]["key_transform"], head_dim: int = 32,
    decode_kernel: DecodeKernel | None = None, **formats,
) -> Simulator:
    """Four requests through prefill and DECODE_STEPS decode steps of one batch:
    a compressed prompt; one below min_prompt_len (quantized, nothing evicted); a chunked
    prompt compressed at its last chunk; and one whose first 32 tokens come from the
    radix cache (the first request's compressed tokens, read by two requests).
    `decode_kernel` replaces the engine's own choice (engine.decode_kernel)."""
    quantization = {**SMALL_CONFIG["quantization"], "guard_bits": guard_bits, "key_transform": key_transform,
                    **formats}
    config = config_from_dict({**SMALL_CONFIG, "quantization": quantization})
    sim = Simulator(num_layers=2, kv_heads=2, q_heads=q_heads, config=config, seed=seed, head_dim=head_dim)
    sim.engine = RecordingAttention(
        sim.pool, sim.req_to_token_pool.req_to_token, attention_impl=attention_impl, logit_cap=logit_cap
    )
    if decode_kernel is not None:
        sim.engine.decode_kernel = dataclasses.replace(decode_kernel, dot_precision="tf32")
    if captured:
        sim._forward = types.MethodType(_captured_graph_forward, sim)
    requests = [
        sim.new_request(prompt(40, 100), DECODE_STEPS),
        sim.new_request(prompt(10, 300), DECODE_STEPS),
        sim.new_request(prompt(24, 500), DECODE_STEPS, chunk_size=16),
    ]
    for request in requests:
        assert sim.admit(request)
        while not request.prompt_done:
            sim.prefill_chunk(request)
            sim.check()
    shared = sim.new_request(prompt(32, 100) + prompt(8, 700), DECODE_STEPS)
    assert sim.admit(shared)
    assert len(shared.req.prefix_indices) == 32
    sim.prefill_chunk(shared)
    requests.append(shared)
    for _ in range(DECODE_STEPS):
        sim.decode_step(requests)
        sim.check()  # pool invariants and SGLang's logical accounting
    return sim


def simulate_batched_prefill(attention_impl: str, seed: int) -> Simulator:
    """Prompts prefilled several per pass, as SGLang batches them: a first pass of three
    (two compressed, one below min_prompt_len), then a pass of a new prompt together with
    one whose first 32 tokens come from the radix cache; then decode steps."""
    sim = Simulator(num_layers=2, kv_heads=2, q_heads=14, seed=seed)
    sim.engine = RecordingAttention(sim.pool, sim.req_to_token_pool.req_to_token, attention_impl=attention_impl)
    first_pass = [sim.new_request(prompt(40, 100), DECODE_STEPS), sim.new_request(prompt(10, 300), DECODE_STEPS),
                  sim.new_request(prompt(57, 500), DECODE_STEPS)]
    for request in first_pass:
        assert sim.admit(request)
    sim.prefill_chunks(first_pass)
    second_pass = [sim.new_request(prompt(32, 100) + prompt(8, 700), DECODE_STEPS),
                   sim.new_request(prompt(33, 900), DECODE_STEPS)]
    for request in second_pass:
        assert sim.admit(request)
    assert len(second_pass[0].req.prefix_indices) == 32
    sim.prefill_chunks(second_pass)
    sim.check()
    for _ in range(DECODE_STEPS):
        sim.decode_step(first_pass + second_pass)
        sim.check()
    return sim


@needs_interpreter
def test_later_chunks_of_a_fresh_prompt_read_only_staging(seed, monkeypatch):
    """A fresh prompt's earlier chunks are still staged at its later chunks: the extend path
    reads staging alone then, not every tier. A prompt that starts from the radix cache
    reads every tier (one gather per layer)."""
    sim = Simulator(num_layers=2, kv_heads=2, q_heads=4, seed=seed)
    sim.engine = CompressedAttention(sim.pool, sim.req_to_token_pool.req_to_token, attention_impl="triton")
    packed_reads = []  # layers whose prefix was read from every tier (kernels/gather_rows.py)
    gather = gather_rows.gather_held_rows

    def counted(pool, layer, *args, **kwargs):
        packed_reads.append(layer)
        return gather(pool, layer, *args, **kwargs)

    monkeypatch.setattr(gather_rows, "gather_held_rows", counted)
    chunked = sim.new_request(prompt(40, 100), chunk_size=16)
    assert sim.admit(chunked)
    while not chunked.prompt_done:
        sim.prefill_chunk(chunked)
    assert packed_reads == []  # chunks 2 and 3 had a 16- and 32-token staged prefix
    shared = sim.new_request(prompt(32, 100) + prompt(8, 700))
    assert sim.admit(shared) and len(shared.req.prefix_indices) == 32
    sim.prefill_chunk(shared)
    assert packed_reads == [0, 1]


@needs_interpreter
def test_an_extend_pass_over_a_cached_prefix_builds_every_layers_lists_at_once(seed, monkeypatch):
    """A prompt that starts from the radix cache lists its held prefix for all layers in
    one count and one scatter launch, at the pass's first layer; each layer then only
    gathers (per layer, the lists' torch glue made a short extend host-bound)."""
    import sglang_kvc.kernels.decode_attention as decode_module

    launches: list[tuple[str, int]] = []  # (kernel, the layer whose extend launched it)
    layer_calls: list[int] = []

    def spy(name):
        kernel = getattr(decode_module, name)

        class Spy:
            def __getitem__(self, grid):
                launches.append((name, layer_calls[-1]))
                return kernel[grid]

        monkeypatch.setattr(decode_module, name, Spy())

    spy("_count_held_kernel")
    spy("_scatter_entries_kernel")
    real_extend = CompressedAttention.extend

    def marked(self, layer_id, *args, **kwargs):
        layer_calls.append(layer_id)
        return real_extend(self, layer_id, *args, **kwargs)

    monkeypatch.setattr(CompressedAttention, "extend", marked)
    sim = Simulator(num_layers=3, kv_heads=2, q_heads=4, seed=seed)
    sim.engine = CompressedAttention(sim.pool, sim.req_to_token_pool.req_to_token, attention_impl="triton")
    first = sim.new_request(prompt(40, 100))
    assert sim.admit(first)
    sim.prefill_chunk(first)
    launches.clear()
    layer_calls.clear()
    shared = sim.new_request(prompt(32, 100) + prompt(8, 700))
    assert sim.admit(shared) and len(shared.req.prefix_indices) == 32
    sim.prefill_chunk(shared)
    assert layer_calls == [0, 1, 2]
    assert launches == [("_count_held_kernel", 0), ("_scatter_entries_kernel", 0)]
    sim.check()


@needs_interpreter
def test_prompts_prefilled_together_compress_as_with_the_torch_reference(seed):
    """Several prompts finishing in one pass are scored by one pair of window-score launches
    and selected together (policy.select_for_requests); the torch path scores them one by
    one. Both keep, guard and evict the same tokens in every layer."""
    reference = simulate_batched_prefill("torch", seed)
    triton = simulate_batched_prefill("triton", seed)
    assert torch.equal(triton.pool.location, reference.pool.location)
    tiers = set(tier_of(triton.pool.location[:, 1:]).flatten().tolist())
    assert {Tier.LOWBIT, Tier.GUARD, Tier.EVICTED} <= tiers


def test_layers_compressed_in_groups_store_what_all_layers_at_once_store(seed, monkeypatch):
    """A pass compresses every layer at once unless the gathered keys would pass
    `_MAX_GROUPED_KEY_BYTES` (a long prompt's last chunk); then in groups of layers, down to
    one layer at a time. The tokens kept, guarded and evicted and the rows they take are the
    same either way."""
    import sglang_kvc.engine as engine_module

    together = simulate_batched_prefill("torch", seed)
    monkeypatch.setattr(engine_module, "_MAX_GROUPED_KEY_BYTES", 1)  # one layer per group
    one_by_one = simulate_batched_prefill("torch", seed)
    assert torch.equal(together.pool.location, one_by_one.pool.location)
    for store in ("lowbit", "guard", "staging"):
        mine, theirs = getattr(together.pool, store), getattr(one_by_one.pool, store)
        for a, b in zip(mine.key_tensors() + mine.value_tensors(), theirs.key_tensors() + theirs.value_tensors()):
            assert torch.equal(a, b), store
    for a, b in zip(together.engine.decode_outputs, one_by_one.engine.decode_outputs):
        assert torch.equal(a, b)


# The engine's choice of split kernel follows the formats (engine.decode_kernel):
# SMALL_CONFIG's 3-bit keys take v4, 2-bit keys in groups of 16 v2. v5 (opt-in, not chosen yet)
# is put in by hand, on 4-bit keys and values in groups of 64 (a head of 64 channels).
DECODE_FORMATS = {"v4": {}, "v2": {"key_bits": 2},
                  "v5": {"key_bits": 4, "value_bits": 4, "group_size": 64, "head_dim": 64,
                         "decode_kernel": DecodeKernel("v5", 64)}}


@needs_interpreter
@pytest.mark.parametrize("guard_bits", [16, 8])
@pytest.mark.parametrize("q_heads, kernel", [(14, "v4"), (4, "v4"), (14, "v2"), (14, "v5")],
                         ids=["gqa7", "gqa2", "gqa7-v2", "gqa7-v5"])
def test_triton_decode_matches_torch_reference(q_heads, kernel, guard_bits, seed):
    reference = simulate("torch", q_heads, guard_bits, seed, **DECODE_FORMATS[kernel])
    triton = simulate("triton", q_heads, guard_bits, seed, **DECODE_FORMATS[kernel])
    assert triton.engine.attention_impl == "triton" and reference.engine.attention_impl == "torch"
    assert triton.engine.decode_kernel.version == kernel

    # The decode path only reads: both runs leave every map and row in the same place.
    assert torch.equal(triton.pool.location, reference.pool.location)
    assert torch.equal(triton.pool.staging_row, reference.pool.staging_row)
    # ...and the batch spanned every tier in every layer, so each was compared.
    for request in triton.live:
        assert request.outputs == DECODE_STEPS
    batch_tokens = torch.cat([
        triton.req_to_token_pool.req_to_token[s.req.req_pool_idx, : s.req.kv_committed_len] for s in triton.live
    ]).to(torch.int64)
    for layer in range(triton.num_layers):
        tiers = set(tier_of(triton.pool.location[layer, batch_tokens]).tolist())
        assert {Tier.STAGING, Tier.LOWBIT, Tier.GUARD, Tier.EVICTED} <= tiers, (layer, tiers)
    first = triton.live[0].req  # its first decode token left the window and was migrated
    first_decode_token = triton.req_to_token_pool.req_to_token[first.req_pool_idx, len(first.origin_input_ids)]
    assert (tier_of(triton.pool.location[:, int(first_decode_token)]) == Tier.LOWBIT).all()

    # Prefill: SGLang's extend kernel over the held prefix + the new tokens (fp32 in the
    # interpreter) against `attend`: every chunk, incl. the radix-shared compressed prefix.
    extends, expected_extends = triton.engine.extend_outputs, reference.engine.extend_outputs
    assert len(extends) == len(expected_extends) > 0
    for call, (out, want) in enumerate(zip(extends, expected_extends)):
        torch.testing.assert_close(out, want, atol=DECODE_ATOL, rtol=0, msg=lambda m: f"extend call {call}: {m}")

    outputs, expected = triton.engine.decode_outputs, reference.engine.decode_outputs
    assert len(outputs) == len(expected) == DECODE_STEPS * triton.num_layers
    for call, (out, want) in enumerate(zip(outputs, expected)):
        assert out.shape == want.shape == (len(triton.live), q_heads, triton.head_dim)
        torch.testing.assert_close(out, want, atol=DECODE_ATOL, rtol=0, msg=lambda m: f"decode call {call}: {m}")


@needs_interpreter
def test_extend_takes_the_new_tokens_kv_as_the_layer_staged_them(seed, monkeypatch):
    """Without a key transform, staging holds the new tokens' K/V as the layer handed them
    over, so the extend kernel takes them from there instead of reading them back (two
    gathers per layer): the outputs still match the torch reference, and staging is read
    only for the chunked prompt's staged prefix (its second chunk, 16 rows, in each layer)."""
    from sglang_kvc.stores import DenseStore

    reads = []
    read = DenseStore.read
    monkeypatch.setattr(DenseStore, "read",
                        lambda self, layer, rows, dtype: reads.append(rows.numel()) or read(self, layer, rows, dtype))
    reference = simulate("torch", 14, 16, seed, key_transform="none")
    reads.clear()
    triton = simulate("triton", 14, 16, seed, key_transform="none")
    assert reads == [16, 16]
    extends, expected_extends = triton.engine.extend_outputs, reference.engine.extend_outputs
    assert len(extends) == len(expected_extends) == 5 * triton.num_layers
    for call, (out, want) in enumerate(zip(extends, expected_extends)):
        torch.testing.assert_close(out, want, atol=DECODE_ATOL, rtol=0, msg=lambda m: f"extend call {call}: {m}")


GRAPH_PADDING = 3  # SGLang pads a decode batch up to the next captured batch size
GRAPH_MAX_BS = 16


def _captured_graph_forward(sim: Simulator, batch, loc: torch.Tensor) -> None:
    """Simulator._forward, but a DECODE pass runs as SGLang's decode CUDA-graph runner
    drives the backend: `capture_decode` is handed slices of static buffers that hold no
    data yet (a graph records launches, not values); the runner then refills the buffers
    in place (padded slots: request slot 0, sequence length 1, token id 0), the backend's
    replay preparation runs on the real requests, and the layers run on the padded batch."""
    if not batch.is_decode:
        Simulator._forward(sim, batch, loc)
        return
    if not hasattr(sim, "graph_buffers"):
        sim.graph_buffers = {
            "req_pool_indices": torch.zeros(GRAPH_MAX_BS, dtype=torch.int64),
            "seq_lens": torch.ones(GRAPH_MAX_BS, dtype=torch.int64),
            "out_cache_loc": torch.zeros(GRAPH_MAX_BS, dtype=torch.int64),
        }
    buffers = sim.graph_buffers
    real = len(batch.seq_lens)
    padded = real + GRAPH_PADDING
    views = {name: buffer[:padded] for name, buffer in buffers.items()}
    for buffer in buffers.values():  # stale values from an earlier step must not leak in
        buffer.fill_(-1)
    sim.engine.capture_decode(views["req_pool_indices"], views["seq_lens"], sim.context_len)

    views["req_pool_indices"].zero_()
    views["req_pool_indices"][:real] = torch.tensor(batch.req_pool_indices)
    views["seq_lens"].fill_(1)
    views["seq_lens"][:real] = torch.tensor(batch.seq_lens)
    views["out_cache_loc"].zero_()
    views["out_cache_loc"][:real] = loc
    # The host lists, as the backend takes them from the ForwardBatch.init_new hook.
    sim.engine.prepare_replay(views["req_pool_indices"][:real], views["seq_lens"][:real], loc,
                              (list(batch.req_pool_indices), list(batch.seq_lens)))

    padding = torch.Generator().manual_seed(12345)  # keeps the simulator's own stream in step
    for layer in sim.layers:
        k = torch.randn(real, sim.kv_heads, sim.head_dim, generator=sim.generator)
        v = torch.randn(real, sim.kv_heads, sim.head_dim, generator=sim.generator)
        q = torch.randn(real, sim.q_heads, sim.head_dim, generator=sim.generator)
        k, v, q = (
            torch.cat((x, torch.randn(GRAPH_PADDING, *x.shape[1:], generator=padding))) for x in (k, v, q)
        )
        sim.pool.set_kv_buffer(layer, views["out_cache_loc"], k, v)
        sim.engine.decode(layer.layer_id, q, sim.head_dim**-0.5)


@needs_interpreter
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "graph"])
def test_a_decode_pass_counts_every_layer_in_one_launch(captured, seed, monkeypatch):
    """Per decode pass the entry builders launch one count for all layers (at the first
    layer) and one scatter per layer: what each layer's attention call launches, in order."""
    import sglang_kvc.kernels.decode_attention as decode_module

    calls: list[list[str]] = []

    def record(name):
        kernel = getattr(decode_module, name)

        class Spy:
            def __getitem__(self, grid):
                calls[-1].append(name)
                return kernel[grid]

        monkeypatch.setattr(decode_module, name, Spy())

    record("_count_held_kernel")
    record("_region_scatter_kernel")
    for method in ("decode", "extend"):
        real = getattr(RecordingAttention, method)

        def marked(self, layer_id, *args, _real=real, _method=method, **kwargs):
            calls.append([f"{_method} {layer_id}"])
            return _real(self, layer_id, *args, **kwargs)

        monkeypatch.setattr(RecordingAttention, method, marked)
    sim = simulate("triton", 14, 16, seed, captured=captured)
    decode_calls = [call for call in calls if call[0].startswith("decode")]
    assert len(decode_calls) == DECODE_STEPS * sim.num_layers
    for call in decode_calls:
        first_layer = call[0] == "decode 0"
        assert call[1:] == (["_count_held_kernel"] if first_layer else []) + ["_region_scatter_kernel"], call


@needs_interpreter
def test_captured_decode_matches_eager_decode(seed):
    """The CUDA-graph decode path (static buffers, fixed regions, padded batch) gives the
    eager Triton path's outputs for the real requests and leaves the pool in the same state."""
    eager = simulate("triton", 14, 16, seed)
    captured = simulate("triton", 14, 16, seed, captured=True)
    assert torch.equal(captured.pool.location, eager.pool.location)
    assert torch.equal(captured.pool.staging_row, eager.pool.staging_row)
    assert captured.pool.staging.k[0][0].abs().sum() > 0  # the padded slots wrote to the scratch row
    real = len(eager.live)
    outputs, expected = captured.engine.decode_outputs, eager.engine.decode_outputs
    assert len(outputs) == len(expected) == DECODE_STEPS * eager.num_layers
    for call, (out, want) in enumerate(zip(outputs, expected)):
        assert out.shape[0] == real + GRAPH_PADDING
        assert torch.isfinite(out).all()  # padded requests too: they flow through the model
        torch.testing.assert_close(out[:real], want, atol=DECODE_ATOL, rtol=0, msg=lambda m: f"decode call {call}: {m}")


def test_capture_needs_the_triton_path():
    sim = Simulator(num_layers=1)
    engine = CompressedAttention(sim.pool, sim.req_to_token_pool.req_to_token, attention_impl="torch")
    with pytest.raises(RuntimeError, match="--disable-cuda-graph"):
        engine.capture_decode(torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64), 64)


@needs_interpreter
def test_logit_cap_decodes_on_the_torch_path(seed):
    """The kernel has no soft-cap: the triton engine must fall back, not ignore it."""
    reference = simulate("torch", 4, 16, seed, logit_cap=0.5)
    triton = simulate("triton", 4, 16, seed, logit_cap=0.5)
    for out, want in zip(triton.engine.decode_outputs, reference.engine.decode_outputs, strict=True):
        assert torch.equal(out, want)


@needs_interpreter
def test_kernel_warm_up_leaves_the_pool_as_it_was(seed, monkeypatch):
    """The start-up warm-up runs the extend path's entry builder on request slot 0, the
    batched window-score kernels on scratch tensors, and the candidates' search and a free
    on token 0: with prompts already prefilled and decoding, every table and free list of the
    pool must be unchanged."""
    sim = simulate("triton", 4, 8, seed)
    pool = sim.pool
    free_lists = [pool.staging_free, *pool.lowbit_free, *pool.guard_free]

    def state():
        return ([t.clone() for t in (pool.location, pool.staging_row)] + [f.buffer.clone() for f in free_lists],
                [f.available() for f in free_lists], pool.staged_count)

    before = state()
    engine = CompressedAttention(pool, sim.req_to_token_pool.req_to_token, attention_impl="triton")
    assert engine.scorer.implementation == "triton"
    gathered = []
    gather = gather_rows.gather_held_rows
    monkeypatch.setattr(gather_rows, "gather_held_rows", lambda *args: gathered.append(gather(*args)))
    engine.warm_up_kernels(torch.bfloat16, q_heads=4)
    pool.return_freed_rows(wait=True)
    after = state()
    for table, want in zip(after[0], before[0], strict=True):
        assert torch.equal(table, want)
    assert after[1:] == before[1:]
    pool.check_invariants(full=True)
    # The prefix gather ran (compiled, on a GPU) on slot 0, whose one token holds nothing.
    [(k, v)] = gathered
    assert k.dtype == torch.bfloat16 and not k.any() and not v.any()


def test_attention_impl_choice():
    sim = Simulator(num_layers=1)
    req_to_token = sim.req_to_token_pool.req_to_token
    assert CompressedAttention(sim.pool, req_to_token).attention_impl == "torch"  # auto, CPU pool
    assert CompressedAttention(sim.pool, req_to_token, attention_impl="triton").attention_impl == "triton"
    with pytest.raises(ValueError, match="attention_impl"):
        CompressedAttention(sim.pool, req_to_token, attention_impl="cuda")


def test_decode_kernel_choice():
    """The served v5 variant for K4V2 g64 alone (bench v17 / v20, serving runs 49 / 50); elsewhere v4 wherever
    it measured faster than v2 on the H200 (bench v14 / v15), v2 for 2-bit keys in groups below
    64; BLOCK_N 32 for v4 (64 for 3-bit keys), v2's own rule otherwise."""
    def choice(key_bits, group_size, value_bits=2, value_group_size=None):
        kernel = decode_kernel(PackedFormat(key_bits, 128, group_size),
                               PackedFormat(value_bits, 128, value_group_size or group_size))
        return kernel.version, kernel.block_n

    tuned = decode_kernel(PackedFormat(4, 128, 64), PackedFormat(2, 128, 64))  # the tuned configs
    assert tuned == DecodeKernel("v5", 64, dot_precision="bf16", max_registers=168, pair_order=True,
                                 in_place_values=True, wide_offsets=True)
    # What serving run 50 and bench v20 / v21 ran (then without the suffix: 64-bit offsets were the only ones).
    assert tuned.name == "v5_block_n_64_r168_bf16_pairs_inplace_wide"
    assert choice(4, 64, value_bits=4) == ("v4", 32)
    assert choice(4, 128) == ("v4", 32)
    assert choice(4, 32, value_group_size=64) == ("v4", 32)
    assert choice(2, 64) == ("v4", 32)  # qwen_12x
    assert choice(3, 32) == ("v4", 64)  # qwen_8x
    assert choice(8, 32, 8) == ("v4", 32)  # retain_all_8bit
    assert choice(2, 32) == ("v2", 64)  # qwen_8x_aggressive
    assert choice(2, 16) == ("v2", 64)
    assert choice(2, 128) == ("v4", 32)


def test_decode_kernel_parse():
    """DecodeKernel.parse reads DecodeKernel.FORM (SGLANG_KVC_DECODE_KERNEL, bench_kernels
    --candidates, profile_decode --kernel); its name is the benchmark's key; a malformed text
    names the form."""
    assert DecodeKernel.parse("v5:64") == DecodeKernel("v5", 64)
    assert DecodeKernel.parse("v5:128:w8:bf16") == DecodeKernel("v5", 128, 8, "bf16")
    assert DecodeKernel.parse("v4:32:fp16:r168:w2") == DecodeKernel("v4", 32, 2, "fp16", 168)
    assert DecodeKernel.parse("v5:64:pairs:r168") == DecodeKernel("v5", 64, max_registers=168, pair_order=True)
    assert DecodeKernel.parse("v5:64:biasreg:r168:pairs") == DecodeKernel("v5", 64, max_registers=168,
                                                                           pair_order=True, bias_register=True)
    assert DecodeKernel.parse("v5:64:inplace:pairs") == DecodeKernel("v5", 64, pair_order=True,
                                                                      in_place_values=True)
    assert DecodeKernel.parse("v4:32:pipelined:lanekeys:pairs") == DecodeKernel(
        "v4", 32, pair_order=True, lane_keys=True, pipelined_loads=True)
    assert DecodeKernel.parse("v5:64:r168:bf16:pairs:inplace:lanekeys:pipelined").name == (
        "v5_block_n_64_r168_bf16_pairs_inplace_lanekeys_pipelined")
    assert DecodeKernel.parse("v5:64:wide:pairs") == DecodeKernel("v5", 64, pair_order=True, wide_offsets=True)
    assert DecodeKernel.parse("v5:128:g8:r168") == DecodeKernel("v5", 128, max_registers=168, block_g=8)
    assert DecodeKernel.parse("v5:64:r168:g8:bf16:pairs").name == "v5_block_n_64_r168_g8_bf16_pairs"
    assert DecodeKernel.parse("v5:64:r168:bf16:pairs:inplace:wide").name == "v5_block_n_64_r168_bf16_pairs_inplace_wide"
    assert [DecodeKernel.parse(text).name for text in ("v4:32", "v5:128:w8", "v5:64:r168:bf16:pairs",
                                                       "v2:16:w4:auto", "v4:32:pairs:biasreg",
                                                       "v5:64:r168:bf16:pairs:biasreg:inplace")] == [
        "v4_block_n_32", "v5_block_n_128_w8", "v5_block_n_64_r168_bf16_pairs", "v2_block_n_16",
        "v4_block_n_32_pairs_biasreg", "v5_block_n_64_r168_bf16_pairs_biasreg_inplace"]
    for bad in ("v9:64", "v5", "v5:x", "v5:48", "v5:8", "v5:0", "v5:64:bf8", "v5:64:w8:w4", "v5:64:w", "v5:64:w3",
                "v5:64:r16", "v5:64:r300", "v5:64:r168:r128", "v2:64:pairs", "v5:64:pairs:pairs", "v5:64:biasreg",
                "v5:64:pairs:biasreg:biasreg", "v5:64:inplace", "v5:64:pairs:inplace:inplace", "v5:64:lanekeys",
                "v2:64:pipelined", "v5:64:pipelined:pipelined", "v2:64:wide", "v5:64:wide:wide", "v4:32:g8",
                "v5:64:g4", "v5:64:g12", "v5:64:g8:g16", ""):
        with pytest.raises(ValueError, match=r"VERSION:BLOCK_N\[:wWARPS\]\[:rREGISTERS\]\[:gROWS\]\[:DOT_PRECISION\]"):
            DecodeKernel.parse(bad)


@needs_interpreter
def test_decode_kernel_override(monkeypatch, seed):
    """SGLANG_KVC_DECODE_KERNEL replaces the measured choice, and decode passes take its fields;
    a kernel the engine does not run, or a malformed value, fails when the engine is built (not
    in a CUDA-graph capture), naming the variable."""
    def engine_for(**quantization):
        config = config_from_dict({**SMALL_CONFIG, "quantization": {**SMALL_CONFIG["quantization"], **quantization}})
        sim = Simulator(num_layers=1, kv_heads=2, q_heads=4, config=config, seed=0, head_dim=64)
        return CompressedAttention(sim.pool, sim.req_to_token_pool.req_to_token, attention_impl="triton")

    assert engine_for().decode_kernel == DecodeKernel("v4", 64)  # SMALL_CONFIG: 3-bit keys
    monkeypatch.setenv("SGLANG_KVC_DECODE_KERNEL", "v5:64:w8:r168:bf16")
    engine = engine_for(key_bits=4, value_bits=4, group_size=64)
    assert engine.decode_kernel == DecodeKernel("v5", 64, 8, "bf16", 168)
    # Decode passes run it (RecordingAttention puts tf32 dots in, see there).
    import sglang_kvc.kernels.decode_attention as decode_module

    calls = []
    real_call = decode_module.decode_attention_for_pool
    monkeypatch.setattr(decode_module, "decode_attention_for_pool",
                        lambda *args, **kwargs: calls.append(kwargs) or real_call(*args, **kwargs))
    monkeypatch.setenv("SGLANG_KVC_DECODE_KERNEL", "v5:64:w8:r168:pairs")
    simulate("triton", 14, 16, seed, key_bits=4, value_bits=4, group_size=64, head_dim=64)
    fields = ("version", "block_n", "num_warps", "dot_precision", "max_registers", "pair_order")
    assert calls and {tuple(call[field] for field in fields) for call in calls} == {("v5", 64, 8, "tf32", 168, True)}
    for value, message in (("v1:16", "v2-v5"), ("v3:64:bf16", "v2-v5"), ("v5:60", "BLOCK_N")):
        monkeypatch.setenv("SGLANG_KVC_DECODE_KERNEL", value)
        with pytest.raises(ValueError, match=f"SGLANG_KVC_DECODE_KERNEL='{value}': .*{message}"):
            engine_for()


def test_decode_num_splits():
    h200 = 132
    assert decode_num_splits(1, 4, 32768, h200) == 64  # one request: as many splits as allowed
    assert decode_num_splits(16, 4, 32768, h200) == 8
    assert decode_num_splits(48, 4, 32768, h200) == 4  # measured best (2 was 10% slower)
    assert decode_num_splits(256, 4, 4096, h200) == 1  # the batch alone fills the GPU
    assert decode_num_splits(4, 2, 100, h200) == 1  # short sequences are not split
    for batch in (1, 3, 48, 1000):
        for tokens in (0, 1, 700, 131072):
            splits = decode_num_splits(batch, 4, tokens, h200)
            assert 1 <= splits <= 64 and splits & (splits - 1) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PackedStore.write takes the kernel path on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_store_write_on_cuda_is_bit_exact(dtype, gen):
    """On CUDA the store writes through kernels.quantize.write_packed; the codes and
    (scale, minimum) pairs must be those of quant.quantize, bit for bit."""
    key_format, value_format = PackedFormat(3, 128, 32), PackedFormat(2, 128, 64)
    store = PackedStore([40], 4, key_format, value_format, "cuda")
    rows = torch.randperm(40, device="cuda", generator=gen)[:33] + 1
    k = (torch.randn(33, 4, 128, device="cuda", generator=gen) * 3).to(dtype)
    v = torch.randn(33, 4, 128, device="cuda", generator=gen).to(dtype)
    store.write(0, rows, k, v)
    for x, fmt, codes, scale_min in ((k, key_format, store.k_codes[0], store.k_scale_min[0]),
                                     (v, value_format, store.v_codes[0], store.v_scale_min[0])):
        expected_codes, expected_scale_min = quantize(x, fmt)
        assert torch.equal(codes[rows], expected_codes)
        assert torch.equal(scale_min[rows].view(torch.int16), expected_scale_min.view(torch.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DenseStore.write_slots takes the kernel path on CUDA only")
def test_staging_write_on_cuda_matches_the_torch_scatter(gen):
    """On CUDA the staging insert is kernels.staging.write_staged (one launch)."""
    from sglang_kvc.stores import DenseStore

    store = DenseStore([40], 4, 128, torch.bfloat16, "cuda")
    staging_row = torch.zeros(64, dtype=torch.int32, device="cuda")
    staging_row[1:40] = (torch.randperm(39, device="cuda", generator=gen) + 1).to(torch.int32)
    slots = torch.randperm(39, device="cuda", generator=gen)[:17] + 1
    k, v = (torch.randn(17, 4, 128, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    store.write_slots(0, slots, staging_row, k, v)
    rows = staging_row[slots].to(torch.int64)
    assert torch.equal(store.k[0][rows], k) and torch.equal(store.v[0][rows], v)


# SGLang's stage-1 kernel computes exp(-inf - -inf) in the padding rows of its head block
# (masked, never stored); numpy warns about it in the interpreter.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_bench_kernels_smoke(tmp_path, monkeypatch):
    """eval/bench_kernels.py --smoke end to end (tiny shapes; the interpreter on CPU)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "eval" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    # Two configs keep the interpreter run short: 3-bit keys with a bf16 guard, and 4/2-bit.
    configs = [REPO / "configs" / "qwen_8x.yaml", REPO / "configs" / "qwen_8x_tuned.yaml"]
    assert bench.main(["--smoke", "--out", str(tmp_path), "--configs", *map(str, configs),
                       "--candidates", "v5:64:bf16:pairs:biasreg:inplace", "--candidate-splits", "1,2"]) == 0

    report = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert {"date", "device", "versions", "command", "copy_bandwidth", "bytes_counted"} <= report.keys()
    assert {"torch", "triton", "sglang"} <= report["versions"].keys()
    assert "--smoke" in report["command"]
    config_names = set(report["configs"])
    assert config_names == {"qwen_8x", "qwen_8x_tuned"}
    assert report["window_scores"]["max_abs_error"] < 1e-4, report["window_scores"]
    assert [grid["status"] for grid in report["grids"]] == ["ok"] * len(bench.SMOKE_GRIDS)
    for grid in report["grids"]:
        assert all("ms" in baseline for baseline in grid["sglang"].values()), grid["sglang"]
        assert set(grid["configs"]) == config_names
        for cell in grid["configs"].values():
            assert "error" not in cell, cell
            assert cell["check"]["ok"], cell["check"]
            assert str(cell["engine_splits"]) in cell["attention_by_splits"]
            assert 0 < cell["bytes"]["attention"] < cell["bytes"]["together"]
            assert cell["summary"]["together_GBps"] > 0
            assert cell["together"]["v2_graph"]["ms"] > 0, cell["together"]["v2_graph"]
            # The decode pass's split of the entry build: all layers' counts, then a scatter per layer.
            assert cell["entry_count_all_layers"]["ms"] > 0 and cell["entry_build_from_counts"]["ms"] > 0
            # The candidates (v5 with bf16 dots on bf16 rows, the pairs' bias in a register, value
            # codes in place, and the engine's): timed from a graph and checked, and from a graph at
            # each --candidate-splits count but the engine's.
            for candidate in cell["candidates"]:
                assert cell["check"]["by_variant"][candidate]["ok"], cell["check"]["by_variant"][candidate]
                assert cell["together"][f"{candidate}_graph"]["ms"] > 0
                for splits in {1, 2} - {cell["engine_splits"]}:
                    assert cell["together"][f"{candidate}_splits_{splits}_graph"]["ms"] > 0
    for written in report["write_packed"].values():
        assert "error" not in written and written["kernel"]["ms"] > 0
    table = (tmp_path / "bench_kernels.md").read_text()
    assert all(f"| {name} |" in table for name in config_names)
    assert "CUDA-graph replay" in table
    assert report["candidates"] == ["v5_block_n_64_bf16_pairs_biasreg_inplace"]
    # The engine's own kernel per config is recorded, timed among the candidates and marked in their table.
    cells = report["grids"][0]["configs"]
    assert {name: cell["engine_kernel"] for name, cell in cells.items()} == {
        "qwen_8x": {"version": "v4", "block_n": 64, "entry_lists": "regions", "name": "v4_block_n_64"},
        "qwen_8x_tuned": {"version": "v5", "block_n": 64, "entry_lists": "regions",
                          "name": "v5_block_n_64_r168_bf16_pairs_inplace_wide"}}
    assert cells["qwen_8x"]["candidates"] == ["v5_block_n_64_bf16_pairs_biasreg_inplace", "v4_block_n_64"]
    assert cells["qwen_8x_tuned"]["candidates"] == ["v5_block_n_64_bf16_pairs_biasreg_inplace",
                                                    "v5_block_n_64_r168_bf16_pairs_inplace_wide"]
    assert "| qwen_8x | v4_block_n_64 (engine) |" in table
    assert "| qwen_8x_tuned | v5_block_n_64_r168_bf16_pairs_inplace_wide (engine) |" in table
    assert "| qwen_8x_tuned | v5_block_n_64_bf16_pairs_biasreg_inplace |" in table
    assert report["candidate_splits"] == [1, 2] and "Candidates at other split counts" in table


def test_bench_candidates_parse(monkeypatch):
    """--candidates VERSION:BLOCK_N[:wWARPS][:DOT_PRECISION] (DecodeKernel.parse): each part
    reaches decode_attention's keyword arguments; a malformed item names the form it wants."""
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "eval" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    candidates = bench.parse_candidates("v5:64,v5:64:bf16,v5:128:w8:r168")
    assert candidates == [DecodeKernel("v5", 64), DecodeKernel("v5", 64, 4, "bf16"),
                          DecodeKernel("v5", 128, 8, max_registers=168)]
    defaults = {"num_warps": 2, "dot_precision": "tf32", "num_stages": None}
    assert bench.candidate_options(candidates[0], defaults) == {
        **defaults, "num_warps": 4, "dot_precision": "auto", "max_registers": None, "pair_order": False,
        "bias_register": False, "in_place_values": False, "lane_keys": False, "pipelined_loads": False,
        "wide_offsets": False, "block_g": None}
    assert bench.candidate_options(candidates[2], defaults) == {
        **defaults, "num_warps": 8, "dot_precision": "auto", "max_registers": 168, "pair_order": False,
        "bias_register": False, "in_place_values": False, "lane_keys": False, "pipelined_loads": False,
        "wide_offsets": False, "block_g": None}
    assert bench.candidate_tolerance(candidates[1], 2e-3) == bench.BF16_DOT_TOLERANCE
    assert bench.candidate_tolerance(candidates[2], 2e-3) == 2e-3
    assert bench.parse_candidates("") == [] and bench.parse_candidates(bench.DEFAULT_CANDIDATES)
    with pytest.raises(argparse.ArgumentTypeError, match="VERSION:BLOCK_N"):
        bench.parse_candidates("v5:64,v5:64:bf8")


def test_bench_kernels_smoke_contiguous_rows(tmp_path, monkeypatch):
    """--row-order contiguous (rows in request order, a fresh server's free lists): the
    engine's call still matches the torch reference on that layout."""
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "eval" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    config = REPO / "configs" / "qwen_8x_tuned.yaml"
    assert bench.main(["--smoke", "--out", str(tmp_path), "--configs", str(config), "--row-order", "contiguous"]) == 0
    report = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert "request" in report["row_order"]
    cell = report["grids"][0]["configs"]["qwen_8x_tuned"]
    assert cell["check"]["ok"], cell["check"]
