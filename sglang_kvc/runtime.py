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
# The Triton decode and quantize kernels pass their interpreter tests but have not yet run
# on a GPU inside the server; until a GPU session validates them they are opt-in.
TRITON_ENV_VAR = "SGLANG_KVC_TRITON"


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
    """SGLANG_KVC_TRITON=1 lets CUDA pools use the Triton kernels (decode attention, quantize)."""
    return os.environ.get(TRITON_ENV_VAR, "0") == "1"
