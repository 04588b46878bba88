"""Hooks on SGLang's scheduler side: last-chunk flags, admission and eviction in physical
rows, token usage in rows, sealing finished requests, the idle leak check, and start-up
verification."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from sglang_kvc import diagnostics
from sglang_kvc.allocator import compressed_allocator_of
from sglang_kvc.backend import DECODE_REQUESTS, EXTEND_REQUESTS, CompressedAttnBackend
from sglang_kvc.pool import CompressedKVPool
from sglang_kvc.runtime import active_config
from sglang_kvc.trace import trace_path, trace_request

logger = logging.getLogger(__name__)

INIT_INFO_KEY = "kv_compress"


# ---- forward batches ---------------------------------------------------------------------------

def publish_batch_requests(result, cls, batch, model_runner, **kwargs):
    """AFTER ForwardBatch.init_new: what the backend needs on the host and the ForwardBatch
    it sees does not carry (or holds only on the device). EXTEND: does this pass finish each
    request's prompt (the chunked request, batch.chunked_req, is the one that does not), and
    the requests' slots. DECODE: the requests' slots and sequence lengths (so that a decode
    pass and its seal read nothing back from the device)."""
    if active_config() is None:
        return None
    mode = result.forward_mode
    if mode.is_extend():
        chunked = getattr(batch, "chunked_req", None)
        EXTEND_REQUESTS.publish([req.rid for req in batch.reqs], [req is not chunked for req in batch.reqs],
                                [req.req_pool_idx for req in batch.reqs])
    elif mode.is_decode() and result.seq_lens_cpu is not None:
        DECODE_REQUESTS.publish([req.rid for req in batch.reqs], [req.req_pool_idx for req in batch.reqs],
                                result.seq_lens_cpu.tolist())
    return None


# ---- memory pressure ----------------------------------------------------------------------------

def evict_until_rows_free(original, tree_cache, num_tokens):
    """AROUND common.evict_from_tree_cache. Stock SGLang evicts the logical shortfall once;
    an evicted compressed token frees fewer rows than one logical slot, so keep evicting
    until the rows are there or nothing is evictable."""
    original(tree_cache, num_tokens)
    allocator = compressed_allocator_of(tree_cache) if tree_cache is not None else None
    if allocator is None or tree_cache.is_chunk_cache():
        return
    while allocator.available_size() < num_tokens and tree_cache.evictable_size() > 0:
        shortfall = num_tokens - allocator.available_size()
        if tree_cache.evict(EvictParams(num_tokens=shortfall)).num_tokens_evicted == 0:
            break


def evictable_tokens(tree_cache) -> torch.Tensor | None:
    """Token ids of every unlocked radix node (what eviction could free): a walk of the whole
    tree, for the idle check of the allocator's `evictable_rows` counter."""
    values, stack = [], list(tree_cache.root_node.children.values())
    while stack:
        node = stack.pop()
        if node.lock_ref == 0 and node.value is not None:
            values.append(node.value)
        stack.extend(node.children.values())
    return torch.cat(values) if values else None


def token_usage_in_rows(result, self, *args, **kwargs):
    """AFTER SchedulerPoolStatsObserver._get_token_info. Stock usage is `1 - (available +
    evictable) / max_total_num_tokens` in logical tokens, and our available size is the row
    headroom of the tightest layer, which a compressed plan sizes below the logical token
    count: an idle server would report the difference as used (0.45 for qwen_8x_tuned), in
    the log line, the metrics and the load reported to routers. Report the rows instead:
    the tightest layer's row usage less the evictable share of the logical tokens (cached
    tokens hold rows that eviction returns; counted at the plan's average rows per token,
    so the figure is exact when idle or when nothing is cached). Available and evictable
    sizes stay SGLang's."""
    allocator = compressed_allocator_of(self)
    if allocator is None:
        return None
    usage = max(0.0, allocator.pool.row_usage() - result.full_evictable_size / self.max_total_num_tokens)
    return dataclasses.replace(result, full_token_usage=usage,
                               full_num_used=round(usage * self.max_total_num_tokens))


def admission_in_rows(result, self, *args, **kwargs):
    """AFTER PrefillAdder.__init__. The adder budgets `available + evictable` logical
    tokens, but evicting a compressed token frees at most one row per layer and often
    none; lower its budget to what evicting every unlocked node would really free (the
    allocator's `evictable_rows`, kept current by patches.radix_cache: a lower bound read
    without a device sync, whatever the size of the cache, while requests run; exact, with
    the pending frees counted, when none runs: a prefill turned down then is not retried
    until a request finishes, and none will)."""
    allocator = compressed_allocator_of(self)
    tree_cache = self.tree_cache
    if allocator is None or tree_cache is None or tree_cache.is_chunk_cache():
        return None
    evictable = tree_cache.evictable_size()
    decision = diagnostics.LAST_ADMISSION
    decision.clear()
    decision.update(evictable=evictable, correction=0)
    if evictable == 0:
        return None
    pool = allocator.pool
    logical = allocator.logical_available_size() + evictable
    if pool.headroom_tokens() >= logical:
        return None  # rows already cover every logical token the adder could count on
    nothing_running = self.running_batch is None or self.running_batch.is_empty()
    if nothing_running:
        pool.return_freed_rows(wait=True)  # the pending frees count too (they only add headroom)
        if pool.headroom_tokens() >= logical:
            return None
    rows = allocator.evictable_rows.refresh() if nothing_running else allocator.evictable_rows.admission_rows()
    physical = min(pool.free_rows(layer) + rows[layer] for layer in range(pool.layer_num)) - pool.staged_count
    budgeted = allocator.available_size() + evictable
    correction = budgeted - min(logical, physical)
    decision.update(logical=logical, physical=physical, budgeted=budgeted, exact=nothing_running)
    if correction > 0:
        decision["correction"] = correction
        self.rem_total_token_offset += correction
        self.cur_rem_token_offset += correction
    return None


def seal_released_request(req, tree_cache, is_insert=True):
    """BEFORE common.release_kv_cache: tokens a finished request leaves in the radix tree
    must not stay in staging (its last decode tokens, an aborted prompt's chunks). The
    decode window knows on the host which they are for a request that finished its prompt;
    otherwise the staging map is read (a device sync, which would wait for the forward in
    flight)."""
    allocator = compressed_allocator_of(tree_cache)
    if allocator is None or not is_insert or tree_cache.is_chunk_cache() or req.req_pool_idx is None:
        return None
    if trace_path() is not None:
        trace_request(allocator.pool, tree_cache.req_to_token_pool.req_to_token, req.req_pool_idx,
                      req.effective_kv_committed_len(), req.rid, "release")
    if getattr(req, "skip_radix_cache_insert", False):
        return None
    committed = req.effective_kv_committed_len()
    pool = allocator.pool
    if pool.decode_window is not None and pool.decode_window.seal_released(req.req_pool_idx, committed):
        return None
    tokens = tree_cache.req_to_token_pool.req_to_token[req.req_pool_idx, :committed].to(torch.int64)
    pool.seal(tokens)
    return None


# ---- idle check and start-up ---------------------------------------------------------------------

# Our idle checks read the whole location map (28 layers x max_total_num_tokens words: ~1.8 GB
# for qwen_8x_tuned's 16M tokens on an H200) and walk the radix tree. SGLang calls on_idle on
# every pass of its loop while idle, so a request arriving meanwhile waited for them; run
# them once per idle period, after it has lasted this long (on_idle comes at least every
# second even with --sleep-on-idle).
IDLE_CHECK_DELAY_S = 1.0


class IdleCheckTimer:
    """When the idle checks are due: once per idle period, after `delay_s` of it. A period
    ends when the scheduler runs a forward (its `forward_ct` moves)."""

    def __init__(self, delay_s: float = IDLE_CHECK_DELAY_S, clock=time.monotonic) -> None:
        self.delay_s = delay_s
        self.clock = clock
        self._forward_ct: int | None = None
        self._since = 0.0
        self._done = False

    def due(self, forward_ct: int) -> bool:
        now = self.clock()
        if forward_ct != self._forward_ct:
            self._forward_ct, self._since, self._done = forward_ct, now, False
        if self._done or now - self._since < self.delay_s:
            return False
        self._done = True
        return True


def idle_check_in_logical_ids(original, self, *args, **kwargs):
    """AROUND Scheduler.on_idle. SGLang's leak check balances logical ids
    (available + cached == total); report those to it, and check the rows ourselves
    (once per idle period: `IdleCheckTimer`)."""
    allocator = compressed_allocator_of(self)
    if allocator is None:
        return original(self, *args, **kwargs)
    allocator.report_logical_size = True
    try:
        result = original(self, *args, **kwargs)
    finally:
        allocator.report_logical_size = False
    if self.is_fully_idle():
        timer = self.__dict__.setdefault("kvc_idle_check_timer", IdleCheckTimer())
        if timer.due(self.forward_ct):
            allocator.pool.check_invariants(full=False)
            check_evictable_rows(self.tree_cache, allocator)
    return result


def check_evictable_rows(tree_cache, allocator) -> bool:
    """The admission counter against a walk of the tree; a mismatch is a bookkeeping bug
    (logged, and the counter takes the walked value, so admission stays safe)."""
    if tree_cache is None or tree_cache.is_chunk_cache():
        return True
    matched, counted, walked = allocator.evictable_rows.matches_tree(evictable_tokens(tree_cache))
    if not matched:
        logger.error("kv-compress: rows held by unlocked radix nodes were counted as %s, the tree holds %s; "
                     "corrected", counted, walked)
    return matched


def verify_components(result, self, *args, **kwargs):
    """AFTER Scheduler.get_init_info: refuse to report ready unless the compressed pool,
    allocator and backend are the ones in use (a plugin failure is only logged by SGLang,
    and must not leave a server running silently uncompressed)."""
    config = active_config()
    if config is None:
        return None
    allocator = compressed_allocator_of(self)
    pool = allocator.pool if allocator is not None else None
    runner = self.tp_worker.model_runner
    backend = runner.attn_backend
    found = {
        "allocator": type(self.token_to_kv_pool_allocator).__name__,
        "pool": type(runner.token_to_kv_pool).__name__,
        "attention backend": type(backend).__name__,
    }
    if not (
        allocator is not None
        and isinstance(runner.token_to_kv_pool, CompressedKVPool)
        and runner.token_to_kv_pool is pool
        and isinstance(backend, CompressedAttnBackend)
    ):
        raise RuntimeError(f"--kv-compress is set but the scheduler runs {found}; refusing to start uncompressed")
    result[INIT_INFO_KEY] = {
        "config": config.name,
        "logical_tokens": pool.size,
        "staging_rows": pool.sizes.staging_rows,
        "lowbit_rows": list(pool.sizes.lowbit_rows),
        "guard_rows": list(pool.sizes.guard_rows),
        "pool_bytes": sum(pool.get_kv_size_bytes()),
        "planned_bytes": pool.sizes.total_bytes,
        "bytes_per_logical_token": pool.plan.bytes_per_logical_token(),
    }
    return result


def require_compressed_schedulers(result, *args, **kwargs):
    """AFTER engine._wait_for_scheduler_ready (launcher process)."""
    if active_config() is None:
        return None
    for info in result:
        if INIT_INFO_KEY not in info:
            raise RuntimeError(
                "--kv-compress is set but a scheduler started without the sglang-kvc plugin "
                "(see its log for the plugin's load error); refusing to serve uncompressed"
            )
    logger.info("kv-compress active: %s", result[0][INIT_INFO_KEY])
    return None
