"""SGLang plugin entry point (`sglang.srt.plugins` group, see pyproject.toml).

`load_plugins()` calls `register()` in the launcher (before argument parsing) and again
in every scheduler process. It registers the hooks of `sglang_kvc.patches`; each hook
does nothing unless `--kv-compress` (or SGLANG_KVC_CONFIG) names a config, so with the
flag absent SGLang behaves exactly as stock.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_kvc.patches import memory, radix_cache, scheduler, server_args
from sglang_kvc.runtime import active_config

logger = logging.getLogger(__name__)

_SA = "sglang.srt.server_args.ServerArgs"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_RC = "sglang.srt.mem_cache.radix_cache.RadixCache"

# The radix cache's lock / insert / evict keep the admission counter current (scheduler).
RADIX_CACHE_HOOKS = (
    (f"{_RC}.inc_lock_ref", radix_cache.lock_takes_rows_off, HookType.AROUND),
    (f"{_RC}.dec_lock_ref", radix_cache.unlock_puts_rows_on, HookType.AROUND),
    (f"{_RC}.insert", radix_cache.new_node_puts_rows_on, HookType.AROUND),
    (f"{_RC}.evict", radix_cache.eviction_takes_rows_off, HookType.AROUND),
    (f"{_RC}.cache_unfinished_req", radix_cache.chunk_matching_the_tree, HookType.AROUND),
)

HOOKS = (
    # server arguments (launcher and scheduler)
    (f"{_SA}.add_cli_args", server_args.add_flag, HookType.AFTER),
    (f"{_SA}.from_cli_args", server_args.capture_flag, HookType.BEFORE),
    (f"{_SA}.__post_init__", server_args.enforce_supported, HookType.BEFORE),
    # pool sizing and construction (scheduler)
    ("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
     memory.compressed_cell_size, HookType.AROUND),
    (f"{_KVC}.config_from_budget", memory.budget_to_planned_tokens, HookType.AROUND),
    (f"{_KVC}._build_mha_kv_pool", memory.build_compressed_pool, HookType.AROUND),
    (f"{_KVC}._build_token_to_kv_pool_allocator", memory.build_compressed_allocator, HookType.AROUND),
    # scheduling (scheduler)
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
     scheduler.publish_batch_requests, HookType.AFTER),
    *RADIX_CACHE_HOOKS,
    ("sglang.srt.mem_cache.common.evict_from_tree_cache", scheduler.evict_until_rows_free, HookType.AROUND),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.__init__", scheduler.admission_in_rows, HookType.AFTER),
    ("sglang.srt.managers.scheduler_components.pool_stats_observer.SchedulerPoolStatsObserver._get_token_info",
     scheduler.token_usage_in_rows, HookType.AFTER),
    ("sglang.srt.mem_cache.common.release_kv_cache", scheduler.seal_released_request, HookType.BEFORE),
    ("sglang.srt.managers.scheduler.Scheduler.on_idle", scheduler.idle_check_in_logical_ids, HookType.AROUND),
    ("sglang.srt.managers.scheduler.Scheduler.get_init_info", scheduler.verify_components, HookType.AFTER),
    # start-up verification (launcher)
    ("sglang.srt.entrypoints.engine._wait_for_scheduler_ready",
     scheduler.require_compressed_schedulers, HookType.AFTER),
)


def _register_attention_backend() -> None:
    """Route SGLang's "triton" backend to ours while compression is on. Keeping the name
    keeps every "triton" special case in ServerArgs working for us."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    stock = ATTENTION_BACKENDS["triton"]
    if getattr(stock, "_kvc_wrapped", False):
        return

    def triton_or_compressed(runner):
        if active_config() is None:
            return stock(runner)
        from sglang_kvc.backend import CompressedAttnBackend

        return CompressedAttnBackend(runner)

    triton_or_compressed._kvc_wrapped = True
    ATTENTION_BACKENDS["triton"] = triton_or_compressed


def install_radix_cache_hooks() -> None:
    """Apply only the radix cache's hooks, for code that drives SGLang's RadixCache outside a
    server (tests/sim.py, eval/admission_cost.py). Applied once per process."""
    for target, hook, hook_type in RADIX_CACHE_HOOKS:
        if target not in HookRegistry._patched:
            HookRegistry.register(target, hook, hook_type)
    HookRegistry.apply_hooks()


def register() -> None:
    for target, hook, hook_type in HOOKS:
        HookRegistry.register(target, hook, hook_type)
    _register_attention_backend()
    config = active_config()  # fails loudly in the scheduler if the config became invalid
    if config is not None:
        logger.info("sglang-kvc plugin loaded with config %s", config.name)
