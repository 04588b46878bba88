"""Per-forward-pass logic of compressed attention: read through the location map,
attend, and compress a prompt when its prefill completes.

`CompressedAttention` is what the SGLang attention backend (backend.py) delegates to;
it only needs the pool, SGLang's `req_to_token` table and a `BatchInfo`, so tests
drive it directly with real SGLang pools and radix caches on the CPU.

Before every pass (`begin`, host side): the pass's new tokens get staging rows, and every
few DECODE passes the tokens that have left the decode window move from staging to the
low-bit tier in all layers (`decode_window.DecodeWindow`).

Per layer of an EXTEND pass:
  1. the backend has written the chunk's K/V to staging (pool.set_kv_buffer);
  2. every query attends to the request's tokens that this layer still holds;
  3. each request's chunk adds its queries to the ones that will score its prompt
     (`RecentQueries`: the last W, window scoring; `StridedQuerySampler`: sampled across
     the prompt, context scoring);
  4. after the last layer, every request whose prompt this pass completes has its
     still-staged tokens scored and selected to each layer's budget, and the pool places
     or evicts them for all such requests and layers at once (pool.compress_layers); then
     the staging rows of compressed tokens are released.

Per layer of a DECODE pass: the new K/V are written to staging, then attention. Decode
attention has two implementations (`attention_impl`): "triton" builds the layer's entry
lists for the whole batch (one launch; the first layer also counts every layer's held
tokens per block, one launch for the pass) and runs the split-K kernel of
`sglang_kvc.kernels` on the packed tiers; "torch" gathers and dequantizes per request
(`pool.gather` + `attend`) and is the numerical reference. "auto" picks triton when the
pool is on CUDA and the kernels are enabled (runtime.triton_kernels_enabled).

CUDA graphs (decode only, Triton path): `capture_decode` sets the pass up from SGLang's
static buffers (request slots, sequence lengths) with one fixed entry region per
request slot of `max_context_len` entries, so that every launch of a layer has shapes
fixed by the batch size; before each replay `prepare_replay` does the host side of
`begin` (staging rows, decode-window moves) for the real requests of the batch.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglang_kvc.attention import attend
from sglang_kvc.context_queries import StridedQuerySampler
from sglang_kvc.decode_window import DecodeWindow
from sglang_kvc.device_copy import to_device
from sglang_kvc.policy import PromptCandidates, TokenScorer, prompt_budgets, scorer_from_config, select_for_requests
from sglang_kvc.pool import CompressedKVPool, Tier
from sglang_kvc.quant import PackedFormat
from sglang_kvc.runtime import DECODE_KERNEL_ENV_VAR, decode_kernel_override, triton_kernels_enabled
from sglang_kvc.trace import trace_path, trace_request

if TYPE_CHECKING:  # the kernels import Triton, which the torch path does without
    from sglang_kvc.kernels.decode_attention import DecodeEntries

logger = logging.getLogger(__name__)

# Chunked requests whose last chunk never came (aborted) leave per-request prefill state
# behind; SGLang prefills one chunked request at a time, so a handful is plenty. The
# requests of the current pass are never dropped, however many there are.
_MAX_PREFILLS_REMEMBERED = 16
# Staged keys gathered at once when a pass compresses several layers together (transient,
# during prefill): a pass of 8K tokens fits all 28 layers of Qwen2.5-7B (~235 MB); a 32K
# prompt's last chunk is compressed 7 layers at a time instead of needing ~0.9 GB.
_MAX_GROUPED_KEY_BYTES = 256 << 20


def _remember(per_request: dict, rid: str, value, in_pass: set[str]):
    """`per_request[rid] = value`, dropping the oldest entries of requests not in the current
    pass (`in_pass`) beyond _MAX_PREFILLS_REMEMBERED."""
    stale = [other for other in per_request if other not in in_pass and other != rid]
    for other in stale[: max(0, len(stale) - _MAX_PREFILLS_REMEMBERED + 1)]:
        del per_request[other]
    per_request[rid] = value
    return value


def _claimed_earlier(tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """For request rows concatenated in `tokens` (`lengths` each; a row's ids are distinct):
    True where the id is also in an earlier row. One sort by (id, row), no host sync."""
    row = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device),
                                  to_device(lengths, torch.int64, tokens.device), output_size=sum(lengths))
    order = torch.argsort(tokens.to(torch.int64) * len(lengths) + row)
    ids = tokens[order]
    later = torch.zeros_like(ids, dtype=torch.bool)
    later[1:] = ids[1:] == ids[:-1]
    claimed = torch.empty_like(later)
    claimed[order] = later
    return claimed


ATTENTION_IMPLS = ("auto", "torch", "triton")

# Split-K factor of the Triton decode kernel (see `decode_num_splits`). Set from the H200
# sweep of 2026-11-29 (docs/results/bench-kernels-2026-11-29-v2.json, v2 at the engine's
# BLOCK_N): with 6 programs per SM the choice is within 8% of the fastest split count for
# every grid and config (the fastest in most); 4 picked 2 splits at 48x32K, 10% slower than 4.
_PROGRAMS_PER_SM = 6
_MIN_TOKENS_PER_SPLIT = 512  # logical tokens; ~60 held entries at retain 0.12
_MAX_SPLITS = 64
_DEFAULT_SM_COUNT = 132  # H100 / H200, for pools not on CUDA (the interpreter)


def decode_block_n(key_bits: int) -> int:
    """Entries per block of the v2 decode kernel. Measured on the H200 (2026-11-29,
    docs/results/bench-kernels-2026-11-29-v2.md): 64 was fastest for every config with 2-
    or 4-bit keys (2.1-2.9x v1), 16 for 3-bit keys (their per-dim word loads; 64 needs
    115 KB of shared memory there)."""
    return 16 if key_bits == 3 else 64


@dataclass(frozen=True)
class DecodeKernel:
    """Which split kernel of kernels.decode_attention the engine runs: its version, BLOCK_N,
    warps, dot_precision, register cap, code order, the codes' bias, the value codes' unpacking
    (in place), the key codes' lane order, who pipelines the loads, whether row offsets are
    64-bit even where 32 bits hold them and the rows the query group is padded to, each field named
    as decode_attention's keyword argument (`arguments`)."""

    version: str
    block_n: int
    num_warps: int = 4
    dot_precision: str = "auto"
    max_registers: int | None = None
    pair_order: bool = False
    bias_register: bool = False
    in_place_values: bool = False
    lane_keys: bool = False
    pipelined_loads: bool = False
    wide_offsets: bool = False
    block_g: int | None = None

    FORM = ("VERSION:BLOCK_N[:wWARPS][:rREGISTERS][:gROWS][:DOT_PRECISION][:pairs[:biasreg][:inplace][:lanekeys]]"
            "[:pipelined][:wide]")

    @property
    def name(self) -> str:
        """"v4_block_n_32", "v5_block_n_128_w8", "v5_block_n_64_r168_bf16_pairs_inplace" (the benchmark's keys)."""
        name = f"{self.version}_block_n_{self.block_n}"
        name += f"_w{self.num_warps}" if self.num_warps != 4 else ""
        name += f"_r{self.max_registers}" if self.max_registers else ""
        name += f"_g{self.block_g}" if self.block_g else ""
        name += f"_{self.dot_precision}" if self.dot_precision != "auto" else ""
        name += "_pairs" if self.pair_order else ""
        name += "_biasreg" if self.bias_register else ""
        name += "_inplace" if self.in_place_values else ""
        name += "_lanekeys" if self.lane_keys else ""
        name += "_pipelined" if self.pipelined_loads else ""
        return name + ("_wide" if self.wide_offsets else "")

    def arguments(self) -> dict:
        """decode_attention's keyword arguments for this kernel (a shallow copy of the fields:
        called per layer on eager decode passes, where `dataclasses.asdict`'s deep copy costs)."""
        return dict(vars(self))

    @classmethod
    def parse(cls, text: str) -> DecodeKernel:
        """"v5:64" -> DecodeKernel("v5", 64); "v5:64:w8:r168:bf16:pairs:biasreg" -> 8 warps, at most
        168 registers per thread, bf16 dots on bf16 rows, codes in pair order, their bias in a
        register; ":inplace" the value codes unpacked in place, ":lanekeys" the key codes in lane order,
        ":pipelined" the packed loops' loads by Triton's pipeliner, ":wide" 64-bit row offsets wherever,
        ":g8" (v5) the query group padded to 8 rows (the optional parts in any order)."""
        from sglang_kvc.kernels.decode_attention import DECODE_VERSIONS, DOT_PRECISIONS

        parts = text.strip().split(":")
        version, block_n, extras = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]

        def numbers(prefix: str) -> list[int]:
            return [int(extra[1:]) for extra in extras if extra[:1] == prefix and extra[1:].isdigit()]

        warps, registers, query_rows = numbers("w"), numbers("r"), numbers("g")
        precisions = [extra for extra in extras if extra in DOT_PRECISIONS]
        flags = ("pairs", "biasreg", "inplace", "lanekeys", "pipelined", "wide")
        pairs, bias, in_place, lanes, pipelined, wide = ([extra for extra in extras if extra == flag] for flag in flags)
        found = (warps, registers, query_rows, precisions, pairs, bias, in_place, lanes, pipelined, wide)
        valid = (version in DECODE_VERSIONS and block_n.isdigit()
                 and int(block_n) >= 16 and not int(block_n) & (int(block_n) - 1)
                 and all(len(items) <= 1 for items in found) and sum(map(len, found)) == len(extras)
                 and (not (pairs or pipelined or wide) or version in ("v4", "v5"))
                 and (not query_rows or version == "v5")
                 and all(rows >= 8 and not rows & (rows - 1) for rows in query_rows)
                 and (not (bias or in_place or lanes) or pairs)
                 and all(count in (1, 2, 4, 8, 16) for count in warps)
                 and all(24 <= count <= 255 for count in registers))
        if not valid:
            raise ValueError(f"{text!r}: want {cls.FORM}: VERSION one of {DECODE_VERSIONS}, BLOCK_N a power of "
                             f"two >= 16, WARPS 1, 2, 4, 8 or 16, REGISTERS 24-255, ROWS a power of two >= 8 "
                             f"for v5, DOT_PRECISION one of "
                             f"{DOT_PRECISIONS}, pairs, pipelined and wide for v4 / v5, biasreg, inplace and "
                             "lanekeys with pairs")
        return cls(version, int(block_n), warps[0] if warps else 4, precisions[0] if precisions else "auto",
                   registers[0] if registers else None, bool(pairs), bool(bias), bool(in_place), bool(lanes),
                   bool(pipelined), bool(wide), query_rows[0] if query_rows else None)


def decode_kernel(key_format: PackedFormat, value_format: PackedFormat) -> DecodeKernel:
    """The decode kernel for a pool whose low-bit keys and values are in these formats.
    Measured on the H200 in CUDA-graph replay (bench v14-v20, docs/kernels.md "Twenty-fifth
    session", "Twenty-seventh session" and "Twenty-eighth session") at 48x32K and 256x4K.

    K4V2 g64 (the three tuned configs): v5 at BLOCK_N 64, capped at 168 registers (three programs
    per SM instead of two), bf16 dots on bf16 rows, codes in pair order: 20-27% less time than v4
    at 32 (bench v17; within 5% at 1x32K), served with every config answering and 2-9 of 1,600
    tiny-suite answers flipped (serving run 49, tiny-serve-v5-kernel-2026-12-02); its value codes
    unpacked in place: another 0.8-2.0% less time at 48x32K and 256x4K (bench v20), served with
    every config answering and 2-4 of 1,600 answers flipped (serving run 50, tiny-serve-inplace-
    2026-12-02). The pairs' bias in a register is not taken: ~3% faster at 48x32K, up to 4%
    slower at 256x4K (bench v19, v20); nor 32-bit row offsets: -0.5% to +2.8% time (slower for
    `qwen_5x_tuned`, bench v22), so it keeps 64-bit ones (`wide_offsets`). The same kernel
    on K8V8 g32 takes 59-81% longer than v4 (the cap spills there) and v5 uncapped 17-19% longer
    (bench v18), so the other formats keep bench v14-v15's choice: v4 (dequantize after the
    dots) where it beat v2 — K2V2 g64 (4-16% at 32), K3V2 g32 (14-17% at 64; v5 at 64 ties it,
    bench v18), K8V8 g32 (2-3% at 32) — and v2 for 2-bit keys in groups below 64 (v4 4-6% slower
    at 64, 56-61% at 32: four 32-channel key dots per block, whose codes lose the vectorized
    shared-memory stores). v4 takes 32-bit row offsets where the tables allow them (v2 always 64-bit
    ones): 0-4% less time than with 64-bit ones, the same output bit for bit (bench v22)."""
    if (key_format.bits, value_format.bits, key_format.group_size, value_format.group_size) == (4, 2, 64, 64):
        return DecodeKernel("v5", 64, dot_precision="bf16", max_registers=168, pair_order=True, in_place_values=True,
                            wide_offsets=True)
    if key_format.bits == 2 and key_format.group_size < 64:
        return DecodeKernel("v2", decode_block_n(key_format.bits))
    return DecodeKernel("v4", 64 if key_format.bits == 3 else 32)


def engine_decode_kernel(pool: CompressedKVPool) -> DecodeKernel:
    """The decode kernel for `pool`: SGLANG_KVC_DECODE_KERNEL's if set (checked here, so a bad
    value fails at start-up, not inside a CUDA-graph capture; every config's group sizes, 16 to
    128, suit every version), else `decode_kernel`'s measured choice."""
    override = decode_kernel_override()
    if override is None:
        return decode_kernel(pool.lowbit.key_format, pool.lowbit.value_format)
    try:
        kernel = DecodeKernel.parse(override)
        if kernel.version == "v1" or (kernel.version, kernel.dot_precision) == ("v3", "bf16"):
            raise ValueError(f"the engine runs the tier-grouped kernels v2-v5 (v3 without bf16 dots), got "
                             f"{kernel.version}")
    except ValueError as error:
        raise ValueError(f"{DECODE_KERNEL_ENV_VAR}={override!r}: {error}") from None
    logger.info("sglang-kvc: decode kernel %s from %s (the measured choice: %s)", kernel.name,
                DECODE_KERNEL_ENV_VAR, decode_kernel(pool.lowbit.key_format, pool.lowbit.value_format).name)
    return kernel


def decode_num_splits(batch_size: int, kv_heads: int, max_seq_len: int, sm_count: int) -> int:
    """Splits per request for `decode_attention`: enough (request, KV head, split)
    programs to give every SM `_PROGRAMS_PER_SM` of them, but no split shorter than
    `_MIN_TOKENS_PER_SPLIT` logical tokens. Rounded down to a power of two (the kernel
    takes any count at run time, without a compiled variant per count)."""
    wanted = math.ceil(_PROGRAMS_PER_SM * sm_count / max(1, batch_size * kv_heads))
    splits = max(1, min(wanted, max_seq_len // _MIN_TOKENS_PER_SPLIT, _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)


class RecentQueries:
    """Window scoring (`sparsity.scoring: window`): the last `window` queries of a prompt,
    collected chunk by chunk (a short last chunk is topped up from the one before). Same
    interface as `context_queries.StridedQuerySampler`, the context-mode collector."""

    def __init__(self, window: int):
        self.window = window
        self._queries: torch.Tensor | None = None
        self._end = 0

    def add(self, queries: torch.Tensor, positions: range, copy: bool = True) -> None:
        """`copy=False` when `queries` is already a small tensor of its own (the engine's
        per-layer gather): a view of it is kept instead of a copy per request and layer.
        Otherwise a copy, so that the pass's whole query tensor is not kept alive."""
        if self._queries is not None and queries.shape[0] < self.window:
            queries = torch.cat((self._queries, queries))
            copy = False  # the concatenation is a tensor of its own
        queries = queries[-self.window :].detach()
        self._queries = queries.clone() if copy else queries
        self._end = positions.stop

    def queries(self) -> torch.Tensor | None:
        return self._queries

    def positions(self) -> torch.Tensor:
        count = self._queries.shape[0]
        return torch.arange(self._end - count, self._end, dtype=torch.int64, device=self._queries.device)


@dataclass(frozen=True)
class DecodeLaunch:
    """What every layer's Triton decode launches read in one decode pass: set by `begin`
    (eager: tight regions back to back, this batch's split count) or by `capture_decode`
    (CUDA graph: SGLang's static buffers, one region of max_context_len entries per request
    slot, a split count for the longest possible requests)."""

    req_pool_indices: torch.Tensor  # [B] int64 on the device
    seq_lens: torch.Tensor  # [B] on the device
    region_indptr: torch.Tensor  # [B + 1] int32: request b's entry slots start here
    entry_capacity: int  # entry slots in all
    max_seq_len: int  # bounds the entry builder's grid
    num_splits: int


@dataclass(frozen=True)
class ExtendInputs:
    """Shared by every layer's extend launch in one pass (built once per pass)."""

    prefix_slots: torch.Tensor  # kv_indices: slot i of the layer's dequantized prefix buffer
    empty_prefix_indptr: torch.Tensor  # kv_indptr of a pass whose requests have no prefix
    empty_prefix: torch.Tensor  # a one-row dummy prefix buffer (read by no launch)


@dataclass(frozen=True)
class BatchInfo:
    is_decode: bool
    req_pool_indices: list[int]
    seq_lens: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    last_chunk: list[bool]  # extend only: does this pass finish the request's prompt?
    rids: list[str]

    @classmethod
    def from_forward_batch(cls, forward_batch, last_chunk: list[bool] | None = None,
                           req_pool_indices: list[int] | None = None) -> "BatchInfo":
        """`req_pool_indices`: the request slots on the host, if the caller has them (the
        ForwardBatch holds them on the device: reading them back is a host sync)."""
        seq_lens = [int(x) for x in forward_batch.seq_lens_cpu.tolist()]
        rpi = req_pool_indices
        if rpi is None:
            rpi = [int(x) for x in forward_batch.req_pool_indices.tolist()]
        bs = len(seq_lens)
        rids = list(forward_batch.rids) if forward_batch.rids else [str(i) for i in rpi]
        if forward_batch.forward_mode.is_decode():
            return cls(True, rpi, seq_lens, [s - 1 for s in seq_lens], [1] * bs, [False] * bs, rids)
        prefix = list(forward_batch.extend_prefix_lens_cpu)
        extend = list(forward_batch.extend_seq_lens_cpu)
        if last_chunk is None:
            last_chunk = [True] * bs
        return cls(False, rpi, seq_lens, prefix, extend, list(last_chunk), rids)


class CompressedAttention:
    def __init__(
        self,
        pool: CompressedKVPool,
        req_to_token: torch.Tensor,
        scorer: TokenScorer | None = None,
        attention_impl: str = "auto",
    ):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        device = pool.location.device
        if attention_impl == "auto":
            attention_impl = "triton" if device.type == "cuda" and triton_kernels_enabled() else "torch"
        self.attention_impl = attention_impl
        self.sm_count = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else _DEFAULT_SM_COUNT
        )
        self._warned_logit_cap = False
        self.pool = pool
        self.req_to_token = req_to_token
        self.config = pool.config
        # With the Triton kernels the window scores are computed without the attention matrix.
        self.scorer = scorer or scorer_from_config(pool.config, implementation=attention_impl)
        self.layer_retain = pool.plan.layer_retain_ratios
        self.decode_kernel = engine_decode_kernel(pool)
        self.window = self.config.sparsity.observation_window
        self.decode_window = DecodeWindow(pool, req_to_token, self.config.quantization.decode_window)
        self.last_layer = pool.layer_num - 1
        # Per request still in prefill, per layer: the queries that will score its prompt.
        self.scoring_queries: dict[str, list[RecentQueries | StridedQuerySampler | None]] = {}
        # Per request still in prefill: the prefix it started with (from the radix cache:
        # compressed, or staged by another request). Its own earlier chunks stay staged until
        # its last chunk, so when every request of a pass started with none, the pass's prefix
        # is all in staging and the extend path reads no other tier.
        self.started_with_prefix: dict[str, int] = {}
        # Requests in prefill whose staged chunks another request may have matched in the
        # radix tree (one began with a prefix while they were in prefill, or had a chunk
        # swapped for cached tokens: pool.chunks_matched_in_tree): their candidates are read
        # from the staging map, since the other may have compressed some of them.
        self.staged_chunks_maybe_shared: set[str] = set()
        self.prefix_in_staging_only = False  # set per extend pass by `begin`
        self.rids_in_pass: set[str] = set()  # the current extend pass's requests (set by `begin`)
        self.batch: BatchInfo | None = None
        self._token_rows: list[torch.Tensor] | None = None
        self._positions: list[torch.Tensor] | None = None
        self._recent_rows: tuple[torch.Tensor, list[tuple[int, int]]] | None = None
        self._extend_pass_inputs: ExtendInputs | None = None
        self._new_token_rows: torch.Tensor | None = None
        # Per extend pass, decided at its first layer (`_compression_candidates`).
        self.candidates: list[torch.Tensor | None] | None = None
        self.candidate_tokens: torch.Tensor | None = None
        self.seal_candidates = False  # every candidate kept unguarded (`_keeps_every_candidate_unguarded`)
        self.capturing = False  # is the current decode pass being recorded into a CUDA graph?
        self.decode_launch: DecodeLaunch | None = None
        # Per decode pass, from its first layer: the sequence lengths as int32 and
        # [layers, B, blocks, 3] held tokens per tier.
        self.decode_seq_lens: torch.Tensor | None = None
        self.held_block_counts: torch.Tensor | None = None
        self.graphs_captured: dict[int, DecodeLaunch] = {}  # by batch size

    # ---- per forward pass -------------------------------------------------------------------
    def begin(self, batch: BatchInfo, new_tokens: torch.Tensor | None = None) -> None:
        """An eager pass. `new_tokens`: the logical ids whose K/V the pass writes (SGLang's
        out_cache_loc), staged here."""
        self.batch = batch
        self.capturing = False
        self.decode_seq_lens = self.held_block_counts = None
        device = self.pool.location.device
        self.req_pool_indices_device = to_device(batch.req_pool_indices, torch.int64, device)
        if batch.is_decode and self.decode_window.due():
            self.decode_window.seal(batch.req_pool_indices, batch.seq_lens)
        if new_tokens is not None:
            self.pool.stage(new_tokens)
        if not batch.is_decode:
            for slot, seq_len, last_chunk in zip(batch.req_pool_indices, batch.seq_lens, batch.last_chunk):
                if last_chunk:
                    self.decode_window.prompt_done(slot, seq_len)
                else:
                    self.decode_window.prompt_chunk(slot)
            self.rids_in_pass = set(batch.rids)
            if self.pool.chunks_matched_in_tree:
                # A chunk was swapped for tokens another request cached: whose, the host does
                # not know, so any request in prefill may share staged chunks with it.
                self.staged_chunks_maybe_shared.update(self.started_with_prefix)
                self.pool.chunks_matched_in_tree.clear()
            for rid, prefix_len in zip(batch.rids, batch.prefix_lens):
                if rid not in self.started_with_prefix:
                    if prefix_len:  # it may have matched the staged chunks of any request in prefill
                        self.staged_chunks_maybe_shared.update(self.started_with_prefix)
                    _remember(self.started_with_prefix, rid, prefix_len, self.rids_in_pass)
            self.staged_chunks_maybe_shared &= self.started_with_prefix.keys()
            self.prefix_in_staging_only = all(self._started_without_prefix(rid) for rid in batch.rids)
        # Per-request host state, built on first use: extend and the torch decode path need
        # it, the Triton decode path does not.
        self._token_rows = self._positions = self._recent_rows = self._extend_pass_inputs = None
        self._new_token_rows = None  # only when the new tokens' K/V are read back from staging
        self._prefix_entries = None  # every layer's, built at the pass's first extend layer
        # Decided at the first layer (the pass's new tokens are staged by then).
        self.candidates = self.candidate_tokens = None
        self.seal_candidates = False
        if self.attention_impl != "triton":
            return
        # What every layer's entry-list build needs, on the device once per pass.
        if not batch.is_decode:
            self.prefix_lens = [seq - ext for seq, ext in zip(batch.seq_lens, batch.extend_lens)]
            self.prefix_lens_device = to_device(self.prefix_lens, torch.int32, device)
            self.qo_indptr_device = to_device([0, *itertools.accumulate(batch.extend_lens)], torch.int32, device)
        else:
            # Each request's slots in every layer's entry arrays: fixed for the step, so each
            # layer's build needs no host glue (kernels.decode_entries_in_regions).
            from sglang_kvc.kernels.decode_attention import region_indptr_for

            max_seq_len = max(batch.seq_lens, default=0)
            self.decode_launch = DecodeLaunch(
                req_pool_indices=self.req_pool_indices_device,
                seq_lens=to_device(batch.seq_lens, torch.int32, device),
                region_indptr=region_indptr_for(batch.seq_lens, device),
                entry_capacity=sum(batch.seq_lens),  # SGLang's seq_lens_sum: a tight bound
                max_seq_len=max_seq_len,
                num_splits=decode_num_splits(len(batch.seq_lens), self.pool.head_num, max_seq_len, self.sm_count),
            )

    def warm_up_kernels(self, query_dtype: torch.dtype = torch.bfloat16, q_heads: int | None = None) -> None:
        """Compile, at start-up, the kernels that SGLang's own warm-up request (a few tokens)
        does not reach, so that no user request waits for Triton: the entry builder and the
        prefix gather of an extend pass that reads a prefix (a radix-cache hit, a prompt's
        second chunk: 1.78 s against stock's 0.10 s for a repeated 512-token prompt in serving
        run 12 before the builder was warmed; 0.75-1.06 s for a repeated 4K prompt on the
        fifteenth session's first runs before the gather was) and the batched window-score
        kernels. Also runs, on token 0 (which holds nothing), the two steps a server first
        takes at its first pass over a cached prefix: the search for staged candidates and a
        free (SGLang frees the tokens that pass recomputes and the tree holds already), so
        that their CUDA kernels load now (serving runs 38-39: +22-39 ms once per server, less
        with CUDA_MODULE_LOADING=EAGER). Leaves the pool's tables as they were."""
        pool = self.pool
        device = pool.location.device
        padding_token = torch.zeros(1, dtype=torch.int64, device=device)
        pool.staged_mask(padding_token).nonzero()
        pool.free_tokens(padding_token)
        if self.attention_impl != "triton":
            return
        from sglang_kvc.kernels.decode_attention import decode_entries, layer_entries
        from sglang_kvc.kernels.gather_rows import gather_held_rows

        # Request slot 0, which SGLang's ReqToTokenPool never hands out (its token 0 holds nothing).
        entries = decode_entries(pool.location, self.req_to_token, torch.zeros(1, dtype=torch.int64, device=device),
                                 torch.ones(1, dtype=torch.int32, device=device), max_seq_len=1, max_entries=1)
        gather_held_rows(pool, 0, layer_entries(entries, 0), 1, query_dtype)
        if self.config.sparsity.scoring != "window":
            return
        # Two prompts with full windows, as every pass of several prompts or layers scores.
        q_heads = q_heads or pool.head_num
        keys_per_prompt = 2 * self.window
        keys = torch.zeros((2 * keys_per_prompt, pool.head_num, pool.head_dim), dtype=pool.staging.dtype, device=device)
        prompts = [
            PromptCandidates(torch.zeros((self.window, q_heads, pool.head_dim), dtype=query_dtype, device=device),
                             torch.arange(keys_per_prompt - self.window, keys_per_prompt, device=device),
                             torch.arange(keys_per_prompt, device=device), keys_per_prompt)
            for _ in range(2)
        ]
        self.scorer.score_prompts(prompts, keys)

    def capture_decode(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, max_context_len: int) -> None:
        """A decode pass recorded into a CUDA graph. `req_pool_indices` / `seq_lens` are
        SGLang's static input buffers (refilled in place before every replay), so the
        recorded launches read each replay's batch; nothing here may depend on their
        values. Request slot b owns entries [b * max_context_len, (b + 1) * max_context_len)
        of every layer's entry arrays."""
        if self.attention_impl != "triton":
            raise RuntimeError(
                "kv-compress: CUDA-graph decode needs the Triton attention path "
                f"(this engine runs {self.attention_impl!r}); pass --disable-cuda-graph"
            )
        batch_size = req_pool_indices.numel()
        device = self.pool.location.device
        # No host-side per-request state inside a graph: fail loudly if a layer reached for it.
        self.batch = self._token_rows = self._positions = None
        self.decode_seq_lens = self.held_block_counts = None
        self.capturing = True
        self.decode_launch = DecodeLaunch(
            req_pool_indices=req_pool_indices,
            seq_lens=seq_lens,
            region_indptr=torch.arange(batch_size + 1, dtype=torch.int32, device=device) * max_context_len,
            entry_capacity=batch_size * max_context_len,
            max_seq_len=max_context_len,
            # Sized for the longest possible requests: the split count is baked into the graph.
            num_splits=decode_num_splits(batch_size, self.pool.head_num, max_context_len, self.sm_count),
        )
        # The graph reads region_indptr at every replay: it must outlive this capture.
        self.graphs_captured[batch_size] = self.decode_launch

    def prepare_replay(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, new_tokens: torch.Tensor,
                       on_host: tuple[list[int], list[int]] | None = None) -> None:
        """The host side of a captured decode pass, before its replay: the real (unpadded)
        requests' oldest decode-window tokens move to the low-bit tier (when due) and their
        new tokens get staging rows. `on_host`: the same requests' slots and sequence lengths
        as host lists, if the caller has them (then the move needs no device sync)."""
        # Named ranges for profiles of the server (eval/server_capacity.py --profile-decode-steps).
        with torch.profiler.record_function("kvc.prepare_replay"):
            if self.decode_window.due():
                with torch.profiler.record_function("kvc.seal"):
                    slots, lengths = on_host if on_host is not None else (None, None)
                    self.decode_window.seal(slots, lengths, req_pool_indices, seq_lens)
            self.pool.stage(new_tokens)

    @property
    def token_rows(self) -> list[torch.Tensor]:
        """Per request of the pass: its logical token ids, position order."""
        if self._token_rows is None:
            self._token_rows = [
                self.req_to_token[rpi, :seq_len].to(torch.int64)
                for rpi, seq_len in zip(self.batch.req_pool_indices, self.batch.seq_lens)
            ]
        return self._token_rows

    @property
    def positions(self) -> list[torch.Tensor]:
        if self._positions is None:
            self._positions = [torch.arange(len(t), device=t.device) for t in self.token_rows]
        return self._positions

    # ---- extend ---------------------------------------------------------------------------------
    def extend(self, layer_id: int, q: torch.Tensor, scaling: float, logit_cap: float = 0.0,
               new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q: [extend tokens, q_heads, head_dim] -> [extend tokens, q_heads, v_head_dim]
        (float32 on the torch path and in the interpreter, q's dtype on the GPU). `new_kv`:
        the new tokens' K/V as the layer just wrote them to staging (the backend's forward
        arguments), so that the Triton path need not read them back."""
        pool = self.pool
        layer = layer_id - pool.start_layer
        q = pool.rotate(q)
        if self.attention_impl == "triton":
            out = self._extend_triton(layer, q, scaling, logit_cap, new_kv)
        else:
            out = self._extend_torch(layer, q, scaling, logit_cap)
        # Every request of the pass has attended before any of them compresses.
        self.compress_layer(layer, q)
        if layer == self.last_layer:
            self._finish_extend()
        return out

    def compress_layer(self, layer: int, q: torch.Tensor) -> None:
        """After a layer's extend attention: keep each request's scoring queries (`q`, rotated,
        the pass's new tokens in request order); after the last layer, compress the prompts
        this pass finishes in every layer at once (`_compress`), or seal them to the low-bit
        tier when scores would decide nothing (`_keeps_every_candidate_unguarded`). Nothing reads a layer's
        compressed state before the pass ends (its staged tokens stay until then), and once
        per pass instead of once per layer is what makes short prompts cheap to compress."""
        batch = self.batch
        if self.candidates is None:
            self.candidates = self._compression_candidates()
            self.seal_candidates = self._keeps_every_candidate_unguarded()
        if not self.seal_candidates:  # else no scores will be needed, nor scoring queries
            self._collect_scoring_queries(layer, q)
        if layer == self.last_layer:
            finishing = [i for i in range(len(batch.rids)) if batch.last_chunk[i] and self.candidates[i].numel()]
            if not finishing:
                return
            if self.seal_candidates:
                # Every candidate goes to the low-bit tier: the decode window's seal, which
                # also returns the staging rows (no scoring, selection or per-tier placing).
                self.pool.seal_staged(self.candidate_tokens)
            else:
                self._compress(finishing)
                self.pool.release_staging(self.candidate_tokens)

    def _collect_scoring_queries(self, layer: int, q: torch.Tensor) -> None:
        """Add this layer's queries to each request's scoring queries (chunk by chunk)."""
        batch = self.batch
        if self.config.sparsity.scoring == "window":
            # One gather per layer of every request's last `window` queries; each request
            # keeps a view of it (no copy per request and layer).
            rows, spans = self._recent_query_rows()
            recent = q[rows]
            for i, (start, stop) in enumerate(spans):
                seq_len = batch.seq_lens[i]
                self._scoring_queries(layer, batch.rids[i]).add(
                    recent[start:stop], range(seq_len - batch.extend_lens[i], seq_len), copy=False)
        else:
            offset = 0
            for i in range(len(batch.rids)):
                extend_len, seq_len = batch.extend_lens[i], batch.seq_lens[i]
                self._scoring_queries(layer, batch.rids[i]).add(q[offset : offset + extend_len],
                                                                range(seq_len - extend_len, seq_len))
                offset += extend_len

    def _keeps_every_candidate_unguarded(self) -> bool:
        """Does every request of the pass finish its prompt keeping all its candidates, in
        every layer, none of them guarded? Then scores decide nothing: a prompt of fewer
        candidates than `min_prompt_len` with too few for a guarded one (a repeated prompt
        whose cached prefix leaves a token or two to compute; a short prompt without a guard
        tier). The prefill of such a pass was host-bound on the scoring and placing it skips
        (serving runs 33-35: ~11 ms of a ~98 ms profiled step after the last layer)."""
        batch = self.batch
        if not all(batch.last_chunk):
            return False
        ratios = set(self.layer_retain)
        for positions in self.candidates:
            count = positions.numel()
            if self.config.guard_count(count) or any(self.config.layer_budget(r, count) != count for r in ratios):
                return False
        return True

    def _extend_torch(self, layer: int, q: torch.Tensor, scaling: float, logit_cap: float) -> torch.Tensor:
        """The reference: per request, every held token of the layer, dequantized, through
        `attend` in fp32 (positions make it causal)."""
        batch, pool = self.batch, self.pool
        out = torch.empty((q.shape[0], q.shape[1], pool.head_dim), dtype=torch.float32, device=q.device)
        offset = 0
        for i, tokens in enumerate(self.token_rows):
            extend_len, seq_len = batch.extend_lens[i], batch.seq_lens[i]
            q_pos = self.positions[i][seq_len - extend_len :]
            k, v, held = pool.gather(layer, tokens, torch.float32)
            out[offset : offset + extend_len] = attend(
                q[offset : offset + extend_len], q_pos, k[held], v[held], self.positions[i][held], scaling, logit_cap
            )
            offset += extend_len
        return out

    def _extend_triton(self, layer: int, q: torch.Tensor, scaling: float, logit_cap: float,
                       new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """SGLang's Triton extend kernel over the layer's held prefix and the new tokens
        (staged bf16), causal among the new ones: one launch for the batch. The prefix is
        dequantized into a transient buffer (prefill only, and only the kept tokens): the
        Triton entry builder lists each request's held prefix tokens (one pass over the
        batch, no loop over requests), and one launch reads every listed row from its tier
        (`kernels/gather_rows.py`)."""
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

        from sglang_kvc.kernels.decode_attention import layer_entries
        from sglang_kvc.kernels.gather_rows import gather_held_rows

        batch, pool = self.batch, self.pool
        device = q.device
        # bf16 as SGLang's own prefill on the GPU; fp32 in the interpreter (tests), whose
        # bf16 dots are not exact.
        dtype = q.dtype if q.is_cuda else torch.float32
        prefix_lens = self.prefix_lens
        capacity = sum(prefix_lens)  # held prefix tokens <= prefix tokens
        # At least one row: a fresh prompt has no prefix, and Triton rejects the null
        # pointer of an empty CUDA tensor (kv_indptr keeps the kernel off the dummy row).
        shape = (max(capacity, 1), pool.head_num, pool.head_dim)
        inputs = self._extend_inputs(shape[0], dtype, device)
        kv_indptr = inputs.empty_prefix_indptr
        if not capacity:
            k_buffer = v_buffer = inputs.empty_prefix
        else:
            entries = layer_entries(self._held_prefix_entries(capacity), layer)
            if self.prefix_in_staging_only:
                # Later chunks of fresh prompts: the whole prefix is still in staging.
                listed = torch.arange(capacity, device=device) < entries.indptr[-1]  # slots past it: unspecified
                rows = torch.where(listed, entries.row.to(torch.int64), 0)
                k_buffer, v_buffer = pool.staging.read(layer, rows, dtype)
            else:
                # Every listed entry from its own tier, dequantized, in one launch (a torch read
                # per tier was ~45 operators per layer: a short extend on a cached prompt was
                # host-bound on them).
                k_buffer, v_buffer = gather_held_rows(pool, layer, entries, capacity, dtype)
            kv_indptr = entries.indptr
        k_extend, v_extend = self._new_tokens_kv(layer, new_kv, q.shape[0], dtype)
        out = torch.empty((q.shape[0], q.shape[1], pool.head_dim), dtype=dtype, device=device)
        extend_attention_fwd(
            q.to(dtype).contiguous(), k_extend.contiguous(), v_extend.contiguous(), out, k_buffer, v_buffer,
            self.qo_indptr_device, kv_indptr, inputs.prefix_slots, None, True, None, max(batch.extend_lens, default=0),
            1.0, 1.0, sm_scale=scaling, logit_cap=logit_cap,
        )
        return out  # in q's dtype on the GPU, as the backend returns it (a float32 copy cost two passes per layer)

    def _new_tokens_kv(self, layer: int, new_kv: tuple[torch.Tensor, torch.Tensor] | None,
                       count: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's new tokens' K/V as staging holds them, in `dtype`: `new_kv` itself
        when it is what was stored (no key transform, one row per new token), else read
        back from staging (two gathers per layer)."""
        pool = self.pool
        if new_kv is not None and pool.rotation is None and new_kv[0].shape[0] == count:
            shape = (count, pool.head_num, pool.head_dim)
            return tuple(x.reshape(shape).to(pool.staging.dtype).to(dtype) for x in new_kv)
        # Just written to staging by set_kv_buffer: every new token is held there.
        if self._new_token_rows is None:  # their staging rows, request order, once per pass
            new_tokens = torch.cat([tokens[prefix:] for tokens, prefix in zip(self.token_rows, self.prefix_lens)])
            self._new_token_rows = pool.staging_row[new_tokens]
        return pool.staging.read(layer, self._new_token_rows, dtype)

    def _held_prefix_entries(self, capacity: int) -> DecodeEntries:
        """Every layer's list of each request's held prefix tokens, built at the pass's first
        extend layer in one build (`decode_entries` over all layers): the map does not change
        during the pass (the new tokens were staged in `begin`; compression runs after the
        last layer)."""
        from sglang_kvc.kernels.decode_attention import decode_entries

        if self._prefix_entries is None:
            self._prefix_entries = decode_entries(
                self.pool.location, self.req_to_token, self.req_pool_indices_device, self.prefix_lens_device,
                max_seq_len=max(self.prefix_lens), max_entries=capacity,
            )
        return self._prefix_entries

    def _extend_inputs(self, prefix_slots: int, dtype, device) -> ExtendInputs:
        """What every layer's extend launch of this pass shares, built at its first layer."""
        inputs = self._extend_pass_inputs
        if inputs is None:
            inputs = self._extend_pass_inputs = ExtendInputs(
                prefix_slots=torch.arange(prefix_slots, dtype=torch.int64, device=device),
                empty_prefix_indptr=torch.zeros(len(self.prefix_lens) + 1, dtype=torch.int32, device=device),
                empty_prefix=torch.zeros((1, self.pool.head_num, self.pool.head_dim), dtype=dtype, device=device),
            )
        return inputs

    def _compression_candidates(self) -> list[torch.Tensor | None]:
        """Per request finishing its prompt: positions of its still-staged tokens (None for
        the others); their logical ids, request order, in `candidate_tokens`.

        A request that started without a prefix, and whose staged chunks no other request
        can have matched, holds only its own tokens, all still staged (its chunks stay staged
        until its last): every position, known on the host. Otherwise the staging map says
        which (one nonzero and one count for the pass, two host syncs; the nonzero alone for
        a single finishing request), and a staged token
        shared by two finishing requests (one matched the other's staged chunks in the radix
        tree) goes to the first, so no token is placed twice."""
        batch = self.batch
        finishing = [i for i in range(len(batch.rids)) if batch.last_chunk[i]]
        result: list[torch.Tensor | None] = [None] * len(batch.rids)
        device = self.pool.location.device
        self.candidate_tokens = torch.empty(0, dtype=torch.int64, device=device)
        if not finishing:
            return result
        rows = [self.token_rows[i] for i in finishing]
        if all(self._started_without_prefix(batch.rids[i]) and batch.rids[i] not in self.staged_chunks_maybe_shared
               for i in finishing):
            for i in finishing:
                result[i] = torch.arange(batch.seq_lens[i], device=device)
            self.candidate_tokens = torch.cat(rows)
            return result
        tokens = torch.cat(rows)
        staged = self.pool.staged_mask(tokens)
        row_lengths = [len(row) for row in rows]
        if len(finishing) > 1:  # (the fast path above took the passes where none can share)
            staged &= ~_claimed_earlier(tokens, row_lengths)
        flat = staged.nonzero().squeeze(1)
        self.candidate_tokens = tokens[flat]
        if len(rows) == 1:  # its positions are the flat indices (a cached prompt's repeat)
            result[finishing[0]] = flat
            return result
        lengths = to_device(row_lengths, torch.int64, tokens.device)
        starts = torch.cumsum(lengths, 0) - lengths
        request_of = torch.repeat_interleave(torch.arange(len(rows), device=tokens.device), lengths,
                                             output_size=tokens.numel())[flat]
        counts = torch.bincount(request_of, minlength=len(rows)).tolist()
        positions = (flat - starts[request_of]).split(counts)
        for i, request_positions in zip(finishing, positions):
            result[i] = request_positions
        return result

    def _started_without_prefix(self, rid: str) -> bool:
        """Did request `rid` begin its prefill with no cached prefix? A request dropped from the
        bounded map counts as having one: that only costs extra reads."""
        return self.started_with_prefix.get(rid, 1) == 0

    def _recent_query_rows(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Rows of the pass's queries that window scoring keeps (each request's last
        `window` new tokens, request order) on the device, and each request's span of
        them; built once per pass."""
        if self._recent_rows is None:
            rows: list[int] = []
            spans: list[tuple[int, int]] = []
            offset = 0
            for extend_len in self.batch.extend_lens:
                kept = min(self.window, extend_len)
                spans.append((len(rows), len(rows) + kept))
                rows.extend(range(offset + extend_len - kept, offset + extend_len))
                offset += extend_len
            self._recent_rows = (to_device(rows, torch.int64, self.pool.location.device), spans)
        return self._recent_rows

    def _scoring_queries(self, layer: int, rid: str) -> "RecentQueries | StridedQuerySampler":
        """The queries that will score request `rid`'s prompt in `layer`, collected chunk by
        chunk (a chunked prompt is scored at its last chunk)."""
        per_layer = self.scoring_queries.get(rid)
        if per_layer is None:
            per_layer = _remember(self.scoring_queries, rid, [None] * self.pool.layer_num, self.rids_in_pass)
        if per_layer[layer] is None:
            context = self.config.sparsity.scoring == "context"
            per_layer[layer] = StridedQuerySampler(self.window) if context else RecentQueries(self.window)
        return per_layer[layer]

    def _compress(self, finishing: list[int]) -> None:
        """Score, select and place the staged tokens of the requests `finishing` (indices
        into the batch) in every layer: groups of layers at once, each group one scoring,
        one selection and one placing (`pool.compress_layers`), each request scored by its
        own queries and budgeted by its layer's ratio. Groups are as large as
        `_MAX_GROUPED_KEY_BYTES` of gathered keys allow: all layers for a pass of short
        prompts, a few for a long prompt's last chunk, whose per-layer work is large anyway."""
        pool = self.pool
        # Every finishing request's candidates, request order (`finishing` is all of them).
        tokens = self.candidate_tokens
        key_bytes_per_layer = tokens.numel() * pool.staging.bytes_per_row(pool.head_num, pool.head_dim,
                                                                          pool.staging.dtype) // 2
        group = max(1, min(pool.layer_num, _MAX_GROUPED_KEY_BYTES // max(1, key_bytes_per_layer)))
        for first in range(0, pool.layer_num, group):
            self._compress_layers(range(first, min(first + group, pool.layer_num)), tokens, finishing)

    def _compress_layers(self, layers: range, tokens: torch.Tensor, finishing: list[int]) -> None:
        """One group of `_compress`: a row per (layer, request), each with that layer's
        queries and ratio, scored and selected together and placed by one pool call."""
        batch, pool = self.batch, self.pool
        # [layers x n] candidates, layer by layer; within a layer request by request, as `tokens`.
        keys = pool.staging.read_keys_layers(layers, pool.staging_row[tokens]).flatten(0, 1)
        # The scoring queries' positions are the same in every layer (the same chunks were added).
        positions = {i: self._scoring_queries(layers.start, batch.rids[i]).positions() for i in finishing}
        prompts, ratios = [], []
        for layer in layers:
            for i in finishing:
                prompts.append(PromptCandidates(self._scoring_queries(layer, batch.rids[i]).queries(), positions[i],
                                                self.candidates[i], batch.seq_lens[i]))
                ratios.append(self.layer_retain[layer])
        selection = select_for_requests(self.config, self.scorer, ratios, prompts, keys)
        budgets, guarded = prompt_budgets(self.config, ratios, prompts)
        per_layer = len(finishing)
        guarded_per_layer = [sum(guarded[j : j + per_layer]) for j in range(0, len(prompts), per_layer)]
        kept_per_layer = [sum(budgets[j : j + per_layer]) for j in range(0, len(prompts), per_layer)]
        pool.compress_layers(layers, tokens, selection, keys, guarded_per_layer,
                             [kept - guards for kept, guards in zip(kept_per_layer, guarded_per_layer)])

    def _finish_extend(self) -> None:
        compressed = sum(1 for positions in self.candidates or () if positions is not None and positions.numel())
        if compressed:
            # Host-known counts only: reading back the rows kept would wait for the whole pass
            # on the GPU, which the overlap scheduler would otherwise spend on the next batch.
            logger.info("kv-compress: %s %d prompt tokens of %d request(s)",
                        "sealed" if self.seal_candidates else "compressed", self.candidate_tokens.numel(), compressed)
        tracing = trace_path() is not None
        for i, rid in enumerate(self.batch.rids):
            if self.batch.last_chunk[i]:
                if tracing:
                    trace_request(self.pool, self.req_to_token, self.batch.req_pool_indices[i], self.batch.seq_lens[i],
                                  rid, "prompt")
                self.scoring_queries.pop(rid, None)
                self.started_with_prefix.pop(rid, None)
                self.staged_chunks_maybe_shared.discard(rid)

    # ---- decode -----------------------------------------------------------------------------------
    def decode(self, layer_id: int, q: torch.Tensor, scaling: float, logit_cap: float = 0.0) -> torch.Tensor:
        """q: [batch, q_heads, head_dim] -> [batch, q_heads, v_head_dim]."""
        pool = self.pool
        layer = layer_id - pool.start_layer
        q = pool.rotate(q)
        if self.capturing:
            if logit_cap > 0:
                raise RuntimeError("kv-compress: the Triton decode kernel has no logit soft-cap; pass --disable-cuda-graph")
            return self._decode_triton(layer, q, scaling)
        if self.attention_impl == "triton" and not self._needs_logit_cap(logit_cap):
            return self._decode_triton(layer, q, scaling)
        return self._decode_torch(layer, q, scaling, logit_cap)

    def _decode_triton(self, layer: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """The layer's entry lists for the whole batch in the pass's fixed regions (each
        layer evicts different tokens), then the split-K kernel; reads only `decode_launch`
        and device tables, so a captured pass records it as is. The first layer counts every
        layer's held tokens per block in one launch (the map is final before the pass), so
        each layer's build is a single scatter launch."""
        # Imported on first use: triton.jit fixes at import whether kernels are interpreted
        # (tests/kernels/conftest.py sets that first), and torch-only runs need no Triton.
        from sglang_kvc.kernels.decode_attention import decode_attention_for_pool, held_per_block

        launch = self.decode_launch
        if layer == 0:
            # int32 once per pass (a graph's static buffer is int64): one cast, not one per layer.
            self.decode_seq_lens = launch.seq_lens.to(torch.int32)
            self.held_block_counts = held_per_block(self.pool.location, self.req_to_token, launch.req_pool_indices,
                                                    self.decode_seq_lens, launch.max_seq_len)
        # On the GPU the merge writes q's dtype (no conversion launch per layer); fp32 in the
        # interpreter, whose outputs the tests compare with the fp32 reference.
        out = torch.empty((q.shape[0], q.shape[1], self.pool.head_dim), device=q.device,
                          dtype=q.dtype if q.device.type == "cuda" else torch.float32)
        return decode_attention_for_pool(
            self.pool,
            layer,
            q,
            self.req_to_token,
            launch.req_pool_indices,
            launch.seq_lens if self.decode_seq_lens is None else self.decode_seq_lens,
            scaling,
            out=out,
            num_splits=launch.num_splits,
            **self.decode_kernel.arguments(),
            max_seq_len=launch.max_seq_len,
            max_entries=launch.entry_capacity,
            region_indptr=launch.region_indptr,
            block_counts=None if self.held_block_counts is None else self.held_block_counts[layer],
        )

    def _decode_torch(self, layer: int, q: torch.Tensor, scaling: float, logit_cap: float) -> torch.Tensor:
        """The reference: per request, gather and dequantize what the layer holds."""
        pool = self.pool
        out = torch.empty((q.shape[0], q.shape[1], pool.head_dim), dtype=torch.float32, device=q.device)
        for i, tokens in enumerate(self.token_rows):
            k, v, held = pool.gather(layer, tokens, torch.float32)
            positions = self.positions[i]
            out[i : i + 1] = attend(
                q[i : i + 1], positions[-1:], k[held], v[held], positions[held], scaling, logit_cap
            )
        return out

    def _needs_logit_cap(self, logit_cap: float) -> bool:
        """The Triton kernel has no logit soft-cap; such models decode on the torch path."""
        if logit_cap <= 0:
            return False
        if not self._warned_logit_cap:
            logger.warning(
                "kv-compress: logit_cap=%s is not in the Triton decode kernel; decoding with torch", logit_cap
            )
            self._warned_logit_cap = True
        return True
