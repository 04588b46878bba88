"""Hooks on SGLang's ServerArgs: the `--kv-compress` flag and the settings it requires."""

from __future__ import annotations

import logging

from sglang_kvc.config import ConfigError, load_config
from sglang_kvc.runtime import active_config, set_active_config_path, triton_kernels_enabled

logger = logging.getLogger(__name__)

FLAG_HELP = (
    "Serve with sglang-kvc compressed KV cache: path to a YAML config "
    "(e.g. configs/qwen_8x.yaml). Requires --attention-backend triton (the default it sets)."
)


class UnsupportedConfiguration(ValueError):
    """A server setting that --kv-compress cannot run with."""


def add_flag(result, parser):
    """AFTER ServerArgs.add_cli_args(parser)."""
    parser.add_argument("--kv-compress", type=str, default=None, metavar="CONFIG_YAML", help=FLAG_HELP)


def capture_flag(cls, args):
    """BEFORE ServerArgs.from_cli_args(cls, args): validate the config and publish its
    path to this process and to the scheduler processes it spawns."""
    path = getattr(args, "kv_compress", None)
    if not path:
        return None
    try:
        load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"--kv-compress: {exc}") from None
    set_active_config_path(path)
    return None


# Settings that cannot be combined with compression, as (field, allowed values, why).
_REQUIRED = (
    ("attention_backend", (None, "triton"), "the compressed pool has its own Triton-backend subclass"),
    ("prefill_attention_backend", (None, "triton"), "the compressed pool has its own Triton-backend subclass"),
    ("decode_attention_backend", (None, "triton"), "the compressed pool has its own Triton-backend subclass"),
    ("speculative_algorithm", (None,), "speculative decoding moves KV slots the pool does not own"),
    ("enable_hierarchical_cache", (False,), "HiCache copies KV by slot id, which is a logical id here"),
    ("disaggregation_mode", ("null",), "PD transfer reads KV buffers by slot id"),
    ("page_size", (None, 1), "the location map is per token"),
    ("kv_cache_dtype", ("auto", "bfloat16", "bf16"), "compression replaces the KV dtype"),
    ("enable_two_batch_overlap", (False,), "two-batch overlap is not supported"),
    ("enable_mixed_chunk", (False,), "mixed prefill/decode batches are not supported"),
    ("tp_size", (1,), "tensor parallel ranks would keep different tokens and diverge"),
    ("pp_size", (1,), "pipeline parallelism is not supported"),
    ("dp_size", (1,), "data parallelism is not supported"),
    ("enable_dp_attention", (False,), "DP attention is not supported"),
    ("enable_hisparse", (False,), "HiSparse has its own pool"),
    ("dcp_size", (None, 1), "decode context parallelism is not supported"),
)


def enforce_supported(self, *args, **kwargs):
    """BEFORE ServerArgs.__post_init__: reject what compression cannot run with, and set
    what it needs before SGLang resolves the rest of the configuration."""
    config = active_config()
    if config is None:
        return None
    problems = [
        f"{field}={getattr(self, field)!r} (allowed: {list(allowed)}; {why})"
        for field, allowed, why in _REQUIRED
        if hasattr(self, field) and getattr(self, field) not in allowed
    ]
    if problems:
        raise UnsupportedConfiguration("--kv-compress cannot run with: " + "; ".join(problems))
    forced = {
        "attention_backend": "triton",
        # Prefill compresses prompts with host-side bookkeeping between layers: never in a graph.
        "disable_prefill_cuda_graph": True,
        # The overlap scheduler stays as the user set it: SGLang's WAR barrier orders the
        # scheduler's frees and seals after the in-flight forward's reads (docs/design.md, 5).
    }
    if not triton_kernels_enabled():
        # Decode graphs need the Triton path (backend.CompressedAttnBackend); the torch
        # reference path loops over requests on the host.
        forced.update(disable_cuda_graph=True, disable_decode_cuda_graph=True)
    changed = {k: v for k, v in forced.items() if getattr(self, k) != v}
    for field, value in forced.items():
        setattr(self, field, value)
    if changed:
        logger.warning("kv-compress (%s) sets %s", config.name, changed)
    require_coarse_war_barrier()
    return None


def require_coarse_war_barrier() -> None:
    """With the overlap scheduler, SGLang's fast WAR barrier lets the scheduler's device work
    (frees, seals of finished requests) run while a decode graph replays. Our graph builds each
    layer's entry lists in two passes over the location map (count, then scatter); a free or
    seal between them makes the scatter overrun the counted slots (an illegal memory access in
    serving run 15, docs/results/serving-2026-11-30.md). The coarse barrier orders that work after
    the whole forward. Set in the launcher's environment, so the schedulers it spawns inherit it."""
    from sglang.srt.environ import envs

    if envs.SGLANG_FORCE_COARSE_WAR_BARRIER.get():
        return
    if envs.SGLANG_FORCE_COARSE_WAR_BARRIER.is_set():
        logger.warning("kv-compress overrides SGLANG_FORCE_COARSE_WAR_BARRIER=0: the decode graph needs the coarse barrier")
    else:
        logger.info("kv-compress sets SGLANG_FORCE_COARSE_WAR_BARRIER=1")
    envs.SGLANG_FORCE_COARSE_WAR_BARRIER.set(True)
