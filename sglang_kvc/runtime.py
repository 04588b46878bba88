"""Which compression config this process serves with, if any.

`--kv-compress PATH` is parsed in the launcher, but the pool is built in the scheduler
process (spawned, so it inherits the environment) and `ServerArgs.from_cli_args` drops
unknown flags. The path therefore travels in an environment variable, which is also how
the offline `sglang.Engine` API enables compression.
"""

from __future__ import annotations

import functools
import os

from sglang_kvc.config import CompressionConfig, load_config

CONFIG_ENV_VAR = "SGLANG_KVC_CONFIG"
# On by default since 2026-11-29: every shipped config served dummy Qwen2.5-7B through the
# Triton kernels inside SGLang's decode CUDA graphs, and at 8 bits with every token kept gave
# stock SGLang's greedy tokens (docs/results/serving-graphs-2026-11-29.md). "0" selects the
# torch reference path (eager, CUDA graphs off), e.g. to compare against it.
TRITON_ENV_VAR = "SGLANG_KVC_TRITON"
# The decode kernel in place of the engine's measured choice (engine.decode_kernel), as
# engine.DecodeKernel.FORM reads it, e.g. "v5:64:r168:pairs": to serve a kernel the benchmark
# found faster before it becomes the default.
DECODE_KERNEL_ENV_VAR = "SGLANG_KVC_DECODE_KERNEL"


def set_active_config_path(path: str) -> None:
    os.environ[CONFIG_ENV_VAR] = os.path.abspath(path)
    _load.cache_clear()


def active_config() -> CompressionConfig | None:
    """The config named by SGLANG_KVC_CONFIG, or None when compression is off."""
    path = os.environ.get(CONFIG_ENV_VAR)
    if not path:
        return None
    return _load(path)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> CompressionConfig:
    return load_config(path)


def triton_kernels_enabled() -> bool:
    """Whether CUDA pools use the Triton kernels (decode attention in CUDA graphs, extend,
    window scores, quantize): yes unless SGLANG_KVC_TRITON=0."""
    value = os.environ.get(TRITON_ENV_VAR, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{TRITON_ENV_VAR}={value!r}; allowed: '0' (torch reference path) or '1' (Triton kernels)")
    return value == "1"


def decode_kernel_override() -> str | None:
    """SGLANG_KVC_DECODE_KERNEL's value, or None where it is unset or empty."""
    return os.environ.get(DECODE_KERNEL_ENV_VAR) or None
