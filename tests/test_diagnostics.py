"""sglang_kvc.diagnostics: what a stalled server tells through its signals."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

from sglang_kvc import diagnostics
from sim import Simulator


def test_sigusr1_writes_every_stack_and_the_process_goes_on():
    code = """
        import os, signal, time
        from sglang_kvc.diagnostics import dump_stacks_on_sigusr1
        dump_stacks_on_sigusr1()
        def waiting_for_the_device():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.5)
        waiting_for_the_device()
        print("still running")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "still running" in result.stdout
    assert "waiting_for_the_device" in result.stderr and "Current thread" in result.stderr


def test_sigusr2_logs_the_accounting_admission_reads(caplog):
    sim = Simulator(logical_tokens=512)
    sim.prefill(sim.new_request(list(range(1, 41)), max_new_tokens=2))
    diagnostics.LAST_ADMISSION.clear()
    diagnostics.LAST_ADMISSION.update(evictable=7, correction=3)
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        diagnostics.log_accounting_on_sigusr2(sim.allocator)
        with caplog.at_level(logging.WARNING, logger="sglang_kvc.diagnostics"):
            os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
        diagnostics.LAST_ADMISSION.clear()
    [record] = [r for r in caplog.records if "kv-compress accounting" in r.getMessage()]
    logged = record.args  # logging keeps a lone mapping argument as the args themselves
    assert logged == diagnostics.accounting(sim.allocator) | {"last_admission": {"evictable": 7, "correction": 3}}
    assert logged["staged_count"] == sim.pool.staged_count and logged["logical_available"] == 512 - 40


def test_each_triton_compile_is_logged_and_earlier_hooks_still_run(caplog, monkeypatch):
    """Triton calls jit_cache_hook before compiling a kernel (after its in-memory cache
    missed) and jit_post_compile_hook after; both with these keyword arguments
    (triton/runtime/jit.py, JITFunction._call_hook). The interpreter compiles nothing, so the
    hooks are called here as Triton calls them."""
    from triton import knobs
    from triton.runtime.jit import JitFunctionInfo

    calls = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kwargs: calls.append(("before", kwargs["key"])))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda **kwargs: calls.append(("after", kwargs["key"])))
    diagnostics.log_triton_compiles()
    diagnostics.log_triton_compiles()  # a second install neither doubles the lines nor loses the chain

    def hook_arguments(key):
        # As triton/runtime/jit.py's _pack_args builds them: types by name, constexprs and
        # specialized values by (argument index,), attributes of the first config likewise.
        compile_info = {"key": key, "signature": {"q_ptr": "*bf16", "n": "i32", "one": "i32", "BLOCK": "constexpr"},
                        "constants": {(2,): 1, (3,): 64}, "configs": [{(0,): [["tt.divisibility", 16]]}]}
        return {"key": key, "repr": "decode_kernel[num_warps=4](...)", "compile": compile_info,
                "fn": JitFunctionInfo("sglang_kvc.kernels.decode", "decode_kernel", None),
                "is_manual_warmup": False, "already_compiled": False}

    with caplog.at_level(logging.INFO, logger="sglang_kvc.diagnostics"):
        assert knobs.runtime.jit_cache_hook(**hook_arguments(("A", 16))) is None  # None: go on compiling
        knobs.runtime.jit_post_compile_hook(**hook_arguments(("A", 16)))
    lines = [r.getMessage() for r in caplog.records if "Triton compiled" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("kv-compress: Triton compiled decode_kernel in ")
    assert lines[0].endswith("ms: q_ptr:*bf16/16, n:i32, one=1, BLOCK=64")
    assert calls == [("before", ("A", 16)), ("after", ("A", 16))]
