"""A small scheduler simulator over real SGLang objects (no mocks of SGLang).

It drives SGLang 0.5.17's own `Req`, `ReqToTokenPool`, `RadixCache`, `alloc_token_slots`
and `release_kv_cache` the way its scheduler does (prefix match, lock, chunked prefill,
`cache_unfinished_req` after every chunk, decode, finish, abort, radix eviction), with
our pool, allocator and attention engine underneath and our scheduler hooks called where
the plugin installs them. Model activations are random tensors: what is under test is
the memory bookkeeping and where tokens live, not a model.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch
from sglang.srt.managers.schedule_batch import Req, ReqKvInfo
from sglang.srt.mem_cache import common
from sglang.srt.mem_cache.allocation import alloc_token_slots
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.sampling.sampling_params import SamplingParams

from sglang_kvc.allocator import CompressedTokenAllocator
from sglang_kvc.config import CompressionConfig, config_from_dict
from sglang_kvc.engine import BatchInfo, CompressedAttention
from sglang_kvc.patches import scheduler as hooks
from sglang_kvc.plugin import install_radix_cache_hooks
from sglang_kvc.planner import ModelShape, RuntimeLimits, plan_for
from sglang_kvc.pool import CompressedKVPool

SMALL_CONFIG = {
    "sparsity": {
        "retain_ratio": 0.3,
        "pyramid_slope": 0.5,
        "observation_window": 4,
        "sink_tokens": 2,
        "recent_window": 4,
        "pooling_kernel": 3,
        "min_prompt_len": 16,
    },
    "quantization": {
        "key_bits": 3,
        "value_bits": 2,
        "group_size": 16,
        "guard_fraction": 0.5,
        "key_transform": "hadamard",
        "decode_window": 2,
    },
}


def small_config(**quantization) -> CompressionConfig:
    """SMALL_CONFIG with some quantization fields replaced (e.g. decode_window=0)."""
    return config_from_dict({**SMALL_CONFIG, "quantization": {**SMALL_CONFIG["quantization"], **quantization}})


class _Layer:
    """What SGLang's RadixAttention hands the pool: only `layer_id` is read."""

    def __init__(self, layer_id: int):
        self.layer_id = layer_id


@dataclass
class SimRequest:
    req: Req
    chunk_size: int
    max_new_tokens: int
    prompt_done: bool = False
    outputs: int = 0
    finished: bool = False

    @property
    def rid(self) -> str:
        return self.req.rid


@dataclass
class Simulator:
    logical_tokens: int = 1024
    num_layers: int = 3
    kv_heads: int = 2
    q_heads: int = 4
    head_dim: int = 32
    context_len: int = 256
    max_requests: int = 8
    config: CompressionConfig = field(default_factory=lambda: config_from_dict(SMALL_CONFIG))
    seed: int = 0

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        shape = ModelShape(self.num_layers, self.kv_heads, self.head_dim, self.context_len)
        self.plan = plan_for(self.config, shape, RuntimeLimits(chunked_prefill_size=64, max_running_requests=self.max_requests))
        sizes = self.plan.sizes_for_tokens(self.logical_tokens)
        self.pool = CompressedKVPool(
            self.logical_tokens, 1, torch.bfloat16, self.kv_heads, self.head_dim, self.num_layers, "cpu",
            plan=self.plan, sizes=sizes,
        )
        self.allocator = CompressedTokenAllocator(self.logical_tokens, torch.bfloat16, "cpu", self.pool)
        self.req_to_token_pool = ReqToTokenPool(
            size=self.max_requests, max_context_len=self.context_len, device="cpu", enable_memory_saver=False
        )
        install_radix_cache_hooks()  # as the plugin does in a scheduler: the admission counter
        self.tree = RadixCache(
            CacheInitParams(
                disable=False,
                req_to_token_pool=self.req_to_token_pool,
                token_to_kv_pool_allocator=self.allocator,
                page_size=1,
            )
        )
        self.engine = CompressedAttention(self.pool, self.req_to_token_pool.req_to_token)
        self.layers = [_Layer(i) for i in range(self.num_layers)]
        self.live: list[SimRequest] = []
        self._next_rid = 0

    # ---- requests ----------------------------------------------------------------------------
    def new_request(self, prompt: list[int], max_new_tokens: int = 4, chunk_size: int = 1 << 30) -> SimRequest:
        rid = f"r{self._next_rid}"
        self._next_rid += 1
        req = Req(rid, "", array("q", prompt), SamplingParams(max_new_tokens=max_new_tokens))
        return SimRequest(req, chunk_size, max_new_tokens)

    def admit(self, sim: SimRequest) -> bool:
        """Prefix match and lock, as the PrefillAdder does; False if it cannot fit now."""
        req = sim.req
        req.init_next_round_input(self.tree)
        prefix = len(req.prefix_indices)
        need = len(req.full_untruncated_fill_ids) - prefix + sim.max_new_tokens
        if need > self.allocator.available_size() + self.tree.evictable_size():
            return False
        if len(self.live) >= self.req_to_token_pool.size:
            return False
        self.tree.inc_lock_ref(req.last_node)
        self.live.append(sim)
        return True

    # ---- prefill ------------------------------------------------------------------------------------
    def prefill(self, sim: SimRequest) -> None:
        """Admit the request (it must fit) and prefill its whole prompt, chunk by chunk."""
        assert self.admit(sim), f"{sim.rid} does not fit"
        while not sim.prompt_done:
            self.prefill_chunk(sim)

    def prefill_chunk(self, sim: SimRequest) -> None:
        """One EXTEND pass over the next chunk of the prompt (SGLang's prepare_for_extend,
        the forward, then cache_unfinished_req)."""
        self.prefill_chunks([sim])

    def prefill_chunks(self, sims: list[SimRequest]) -> None:
        """One EXTEND pass over the next chunk of each request's prompt, as SGLang batches
        several prompts into one prefill."""
        ranges = []
        for sim in sims:
            req = sim.req
            prompt_len = len(req.origin_input_ids)
            start = len(req.prefix_indices)
            ranges.append((start, min(prompt_len, start + sim.chunk_size), prompt_len))
        hooks.evict_until_rows_free(common.evict_from_tree_cache, self.tree, sum(end - start for start, end, _ in ranges))
        locs = []
        for sim, (start, end, _) in zip(sims, ranges):
            req = sim.req
            req.set_extend_range(start, end)
            if req.req_pool_idx is None:  # SGLang takes the request slot with the first chunk
                assert self.req_to_token_pool.alloc([req]) is not None
            rpi = req.req_pool_idx
            if start:
                self.req_to_token_pool.write((rpi, slice(0, start)), req.prefix_indices.to(torch.int32))
            loc = alloc_token_slots(self.tree, end - start)
            self.req_to_token_pool.write((rpi, slice(start, end)), loc.to(torch.int32))
            req.kv = ReqKvInfo(kv_allocated_len=end, swa_evicted_seqlen=0)
            req.kv_committed_len = end
            locs.append(loc)
        batch = BatchInfo(False, [sim.req.req_pool_idx for sim in sims], [end for _, end, _ in ranges],
                          [start for start, _, _ in ranges], [end - start for start, end, _ in ranges],
                          [end == prompt_len for _, end, prompt_len in ranges], [sim.rid for sim in sims])
        self._forward(batch, torch.cat(locs))
        for sim, (_, end, prompt_len) in zip(sims, ranges):
            self.tree.cache_unfinished_req(sim.req, chunked=end != prompt_len)
            sim.prompt_done = end == prompt_len

    # ---- decode -----------------------------------------------------------------------------------------
    def decode_step(self, sims: list[SimRequest]) -> None:
        rpis, seq_lens = [], []
        hooks.evict_until_rows_free(common.evict_from_tree_cache, self.tree, len(sims))
        loc = alloc_token_slots(self.tree, len(sims))
        for i, sim in enumerate(sims):
            req = sim.req
            seq_len = req.kv_committed_len
            self.req_to_token_pool.write((req.req_pool_idx, seq_len), loc[i : i + 1].to(torch.int32))
            req.kv.kv_allocated_len = seq_len + 1
            req.kv_committed_len = seq_len + 1
            rpis.append(req.req_pool_idx)
            seq_lens.append(seq_len + 1)
        rids = [s.rid for s in sims]
        self._forward(BatchInfo(True, rpis, seq_lens, [s - 1 for s in seq_lens], [1] * len(sims), [False] * len(sims), rids), loc)
        for sim in sims:
            # The token this step produced (its KV is written by the next step).
            sim.req.output_ids.append(int(torch.randint(3, 1000, (1,), generator=self.generator)))
            sim.outputs += 1

    def _forward(self, batch: BatchInfo, loc: torch.Tensor) -> None:
        self.engine.begin(batch, loc)
        tokens = loc.numel()
        for layer in self.layers:
            k = torch.randn(tokens, self.kv_heads, self.head_dim, generator=self.generator)
            v = torch.randn(tokens, self.kv_heads, self.head_dim, generator=self.generator)
            q = torch.randn(tokens, self.q_heads, self.head_dim, generator=self.generator)
            self.pool.set_kv_buffer(layer, loc, k, v)
            if batch.is_decode:
                self.engine.decode(layer.layer_id, q, self.head_dim**-0.5)
            else:
                # As the backend calls it: with the K/V just staged.
                self.engine.extend(layer.layer_id, q, self.head_dim**-0.5, new_kv=(k, v))

    # ---- release -------------------------------------------------------------------------------------------
    def finish(self, sim: SimRequest) -> None:
        if sim.req.req_pool_idx is None:  # aborted while waiting: only the prefix lock to drop
            self.tree.dec_lock_ref(sim.req.last_node)
        else:
            hooks.seal_released_request(sim.req, self.tree)
            common.release_kv_cache(sim.req, self.tree)
        sim.finished = True
        self.live.remove(sim)

    def finish_together(self, sims: list[SimRequest]) -> None:
        """Requests finishing in the same step: SGLang releases them one by one inside the
        allocator's free group (process_batch_result_decode)."""
        self.allocator.free_group_begin()
        for sim in sims:
            self.finish(sim)
        self.allocator.free_group_end()

    def retract(self, sim: SimRequest) -> None:
        """A release that caches nothing (SGLang's retraction under memory pressure): the
        request's tokens beyond its cached prefix are freed, staged ones included."""
        if sim.req.req_pool_idx is None:
            self.tree.dec_lock_ref(sim.req.last_node)
        else:
            hooks.seal_released_request(sim.req, self.tree, is_insert=False)
            common.release_kv_cache(sim.req, self.tree, is_insert=False)
        sim.finished = True
        self.live.remove(sim)

    def abort(self, sim: SimRequest) -> None:
        """An abort mid-prefill or mid-decode goes through the normal finish path."""
        self.finish(sim)

    def evict_all(self) -> None:
        self.tree.evict(common.EvictParams(num_tokens=self.logical_tokens))

    # ---- random lifecycles ----------------------------------------------------------------------------------
    def random_step(self, op: str, draw: int, prefixes: list[list[int]]) -> None:
        """One step of a random lifecycle (the tests' hypothesis operations): admit a request
        (on one of `prefixes`, so the radix tree shares compressed and staged tokens),
        prefill a chunk, decode, finish / abort / retract, or evict from the tree; a step
        with nothing to act on does nothing."""
        running = [r for r in self.live if r.prompt_done and r.outputs < r.max_new_tokens]
        prefilling = [r for r in self.live if not r.prompt_done]
        if op == "new" and len(self.live) < self.max_requests - 1:
            length = 5 + draw % 90
            tokens = (prefixes[draw % 2] + list(range(30_000 + draw, 30_000 + draw + length)))[: 10 + length]
            self.admit(self.new_request(tokens, max_new_tokens=1 + draw % 5, chunk_size=8 + draw % 50))
        elif op == "prefill" and prefilling:
            self.prefill_chunk(prefilling[draw % len(prefilling)])
        elif op == "decode" and running:
            self.decode_step(running[: 1 + draw % len(running)])
        elif op in ("finish", "abort") and self.live:
            # Every third draw, two requests finishing in the same step (one free group).
            count = 2 if draw % 3 == 0 and len(self.live) > 1 else 1
            first = draw % len(self.live)
            self.finish_together([self.live[(first + i) % len(self.live)] for i in range(count)])
        elif op == "retract" and self.live:
            self.retract(self.live[draw % len(self.live)])
        elif op == "evict":
            self.tree.evict(common.EvictParams(num_tokens=draw % 200))

    # ---- invariants ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Our rows are consistent, and SGLang's logical accounting balances: every id is
        free, cached in the tree, or held by a live request beyond its cached prefix."""
        self.pool.check_invariants(full=True)
        held_by_requests = sum(
            s.req.kv_committed_len - s.req.cache_protected_len for s in self.live if s.req.kv is not None
        )
        accounted = (
            self.allocator.logical_available_size()
            + self.tree.evictable_size()
            + self.tree.protected_size()
            + held_by_requests
        )
        assert accounted == self.logical_tokens, (accounted, self.logical_tokens)
        assert 0 <= self.allocator.available_size() <= self.allocator.logical_available_size()
        # The admission counter (kept by patches.radix_cache) equals a walk of the tree.
        matched, counted, walked = self.allocator.evictable_rows.matches_tree(hooks.evictable_tokens(self.tree))
        assert matched, (counted, walked)
