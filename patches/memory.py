"""Hooks on SGLang's KV-cache configurator: size the pool from compressed bytes per token,
build CompressedKVPool and CompressedTokenAllocator instead of the bf16 pool."""

from __future__ import annotations

import logging
import math

from sglang.srt.runtime_context import get_parallel

from sglang_kvc import diagnostics
from sglang_kvc.allocator import CompressedTokenAllocator
from sglang_kvc.planner import KVPlan, ModelShape, RuntimeLimits, plan_for
from sglang_kvc.pool import CompressedKVPool
from sglang_kvc.runtime import active_config

logger = logging.getLogger(__name__)

# SGLang's own upper bound for max_running_requests when the user sets none.
_SGLANG_MAX_RUNNING_REQUESTS = 4096


def plan_for_configurator(kvc) -> KVPlan:
    """The plan for the model a KVCacheConfigurator is sizing (the same code as
    `sglang-kvc plan`, fed from the live model and server settings)."""
    config = active_config()
    model = kvc.model_config
    server_args = kvc.server_args
    shape = ModelShape(
        num_layers=kvc.layer_info.num_effective_layers,
        kv_heads=model.get_num_kv_heads(get_parallel().attn_tp_size),
        head_dim=model.head_dim,
        context_len=model.context_len,
    )
    chunk = server_args.chunked_prefill_size
    limits = RuntimeLimits(
        chunked_prefill_size=chunk if chunk and chunk > 0 else model.context_len,
        max_running_requests=server_args.max_running_requests or _SGLANG_MAX_RUNNING_REQUESTS,
    )
    return plan_for(config, shape, limits)


def _reject_unsupported_model(kvc) -> None:
    reasons = []
    if kvc.use_mla_backend:
        reasons.append("MLA attention")
    if kvc.is_hybrid_swa:
        reasons.append("hybrid sliding-window layers")
    if getattr(kvc, "mambaish_config", None) is not None:
        reasons.append("Mamba / linear-attention layers")
    if kvc.model_config.v_head_dim != kvc.model_config.head_dim:
        reasons.append("different K and V head dims")
    if reasons:
        raise ValueError(f"--kv-compress supports plain MHA/GQA models only; this model has {', '.join(reasons)}")


def compressed_cell_size(original, self, kvc, num_layers):
    """AROUND DefaultPoolConfigurator._compute_cell_size: bytes per logical token."""
    if active_config() is None:
        return original(self, kvc, num_layers)
    _reject_unsupported_model(kvc)
    plan = plan_for_configurator(kvc)
    cell = math.ceil(plan.bytes_per_logical_token())
    logger.info(
        "kv-compress (%s): %d bytes per logical token (bf16: %d), %.2f GiB fixed staging",
        plan.config.name, cell, plan.shape.bf16_bytes_per_token(), plan.fixed_bytes() / 2**30,
    )
    return cell


def budget_to_planned_tokens(original, self, budget_bytes, *, cap_tokens=None):
    """AROUND KVCacheConfigurator.config_from_budget: the planner decides how many logical
    tokens the budget holds (it charges the fixed staging tier and rounds every layer's
    rows), exactly as `sglang-kvc plan` prints it; SGLang's own constraints
    (--max-total-tokens, page alignment) still apply on top."""
    if active_config() is None:
        return original(self, budget_bytes, cap_tokens=cap_tokens)
    planned = plan_for_configurator(self).sizes_for_budget(budget_bytes).logical_tokens
    logger.info("kv-compress: KV budget %d bytes holds %d logical tokens (planner)", budget_bytes, planned)
    return original(self, budget_bytes, cap_tokens=planned if cap_tokens is None else min(cap_tokens, planned))


def build_compressed_pool(original, self, *, max_total_num_tokens, mha_pool_class, quant_method=None):
    """AROUND KVCacheConfigurator._build_mha_kv_pool."""
    if active_config() is None:
        return original(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=mha_pool_class, quant_method=quant_method)
    if quant_method is not None:
        raise ValueError("--kv-compress replaces KV quantization; drop --kv-cache-dtype")
    plan = plan_for_configurator(self)
    sizes = plan.sizes_for_tokens(max_total_num_tokens)
    pool = CompressedKVPool(
        max_total_num_tokens,
        page_size=self.pool_page_size,
        dtype=self.kv_cache_dtype,
        head_num=plan.shape.kv_heads,
        head_dim=plan.shape.head_dim,
        layer_num=plan.shape.num_layers,
        device=self.device,
        enable_memory_saver=False,
        plan=plan,
        sizes=sizes,
        start_layer=self.layer_info.start_layer,
        end_layer=self.layer_info.end_layer,
    )
    logger.info(
        "kv-compress (%s): %d logical tokens, staging %d rows, low-bit rows %d..%d, guard rows %d..%d, "
        "%.2f GiB allocated",
        plan.config.name, max_total_num_tokens, sizes.staging_rows, min(sizes.lowbit_rows),
        max(sizes.lowbit_rows), min(sizes.guard_rows), max(sizes.guard_rows), sizes.total_bytes / 2**30,
    )
    return pool


def build_compressed_allocator(original, self, *args, **kwargs):
    """AROUND KVCacheConfigurator._build_token_to_kv_pool_allocator."""
    if active_config() is None:
        return original(self, *args, **kwargs)
    if kwargs.get("token_to_kv_pool_allocator") is not None:
        raise ValueError("--kv-compress does not support a shared (draft) allocator")
    pool = kwargs["token_to_kv_pool"]
    if not isinstance(pool, CompressedKVPool):
        raise TypeError(
            f"kv-compress: SGLang built a {type(pool).__name__} instead of CompressedKVPool; "
            "this model or setting takes a pool path the plugin does not hook"
        )
    allocator = CompressedTokenAllocator(kwargs["sizes"].max_total_num_tokens, self.kv_cache_dtype, self.device, pool)
    diagnostics.dump_stacks_on_sigusr1()
    diagnostics.log_accounting_on_sigusr2(allocator)
    diagnostics.log_triton_compiles()
    return allocator
