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
