"""What a running compressed server tells without stopping: two signals, for when it stalls,
and a log line per Triton compile.

SIGUSR1: every thread's Python stack to the server log (faulthandler: written even while the
scheduler waits inside a CUDA call). SIGUSR2: the KV accounting that admission reads (the
allocator's and the pool's counters and the last admission decision), logged when the
scheduler's main thread next runs Python (never, if it is blocked on the device).
`patches.memory` installs both in each scheduler; eval/server_capacity.py sends them when
requests stop finishing. It also installs a log line for every Triton kernel the scheduler
compiles (or loads from Triton's disk cache) after start-up: a request that waits for one
shows as a slow first token with no slow kernel in a profile.

    kill -USR1 <pid of sglang::scheduler>; kill -USR2 <pid>    # then read the server log
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
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


def log_triton_compiles() -> None:
    """Log each Triton kernel compiled (or loaded from the disk cache) from now on in this
    process: its name, how long it took and its specialization (Triton compiles a kernel
    again for each new combination of constexprs, dtypes and integer arguments that are 1 or
    divisible by 16). Chains to hooks already installed; Triton calls these only when its
    in-memory kernel cache misses, so a warm server pays nothing."""
    from triton import knobs

    runtime = knobs.runtime
    earlier_before, earlier_after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    if getattr(earlier_after, "logs_compiles", False):
        return  # installed already (one scheduler builds one allocator; tests build many)
    started: dict[str, float] = {}

    def before(**hook_args):
        started[str(hook_args["key"])] = time.perf_counter()
        return earlier_before(**hook_args) if earlier_before else None

    def after(**hook_args):
        began = started.pop(str(hook_args["key"]), None)
        milliseconds = (time.perf_counter() - began) * 1000 if began is not None else float("nan")
        logger.info("kv-compress: Triton compiled %s in %.1f ms: %s", hook_args["fn"].name, milliseconds,
                    specialization_summary(hook_args["compile"]))
        return earlier_after(**hook_args) if earlier_after else None

    after.logs_compiles = True
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after


def specialization_summary(compile_info: dict) -> str:
    """One line telling a kernel's compiled variants apart: each argument's type, `/16` where
    Triton specialized it as divisible by 16 (a pointer's alignment, an integer's value),
    `=value` for constexprs and for integers specialized to a constant (1). From the
    `compile` mapping Triton passes its JIT hooks (signature, constants, configs)."""
    constants = compile_info.get("constants") or {}
    attributes = (compile_info.get("configs") or [{}])[0]
    parts = []
    for index, (name, type_name) in enumerate(compile_info.get("signature", {}).items()):
        if (index,) in constants:
            parts.append(f"{name}={constants[(index,)]}")
            continue
        divisible = any(attribute == "tt.divisibility" for attribute, _ in attributes.get((index,), []))
        parts.append(f"{name}:{type_name}{'/16' if divisible else ''}")
    return ", ".join(parts)
