"""Signals a running compressed server answers without stopping, for when it stalls.

SIGUSR1: every thread's Python stack to the server log (faulthandler: written even while the
scheduler waits inside a CUDA call). SIGUSR2: the KV accounting that admission reads (the
allocator's and the pool's counters and the last admission decision), logged when the
scheduler's main thread next runs Python (never, if it is blocked on the device).
`patches.memory` installs both in each scheduler; eval/server_capacity.py sends them when
requests stop finishing.

    kill -USR1 <pid of sglang::scheduler>; kill -USR2 <pid>    # then read the server log
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import weakref

logger = logging.getLogger(__name__)

# The last decision of patches.scheduler.admission_in_rows (a few integers, per admitting step).
LAST_ADMISSION: dict = {}


def dump_stacks_on_sigusr1() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def accounting(allocator) -> dict:
    """What admission and allocation read, now (no device sync)."""
    pool = allocator.pool
    admission_rows = allocator.evictable_rows.admission_rows()
    return {
        "logical_available": allocator.logical_available_size(),
        "row_headroom_tokens": pool.headroom_tokens(),
        "free_rows_min": min(pool.free_rows(layer) for layer in range(pool.layer_num)),
        "staged_count": pool.staged_count,
        "pending_frees": len(pool.deferred_frees),
        "pending_free_tokens": pool.deferred_frees.pending_tokens(),
        "evictable_rows_bound_min": min(admission_rows),
        "evictable_rows_bound_max": max(admission_rows),
        "last_admission": dict(LAST_ADMISSION),
    }


def log_accounting_on_sigusr2(allocator) -> None:
    """Install the SIGUSR2 handler (only the main thread may: elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return
    allocator_ref = weakref.ref(allocator)

    def log_accounting(signum, frame) -> None:
        live = allocator_ref()
        if live is not None:
            logger.warning("kv-compress accounting: %s", accounting(live))

    signal.signal(signal.SIGUSR2, log_accounting)
