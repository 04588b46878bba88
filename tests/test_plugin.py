"""The SGLang plugin: CLI flag, config errors, unsupported settings, hook targets, and the
start-up check that refuses to serve uncompressed."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from sglang_kvc.patches import scheduler as scheduler_hooks
from sglang_kvc.plugin import HOOKS
from sglang_kvc.runtime import CONFIG_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
MODEL = str(REPO / "tests" / "data" / "qwen2.5-7b-instruct")


def run_python(code: str, timeout: int = 240, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV_VAR}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
    )


def test_every_hook_target_exists_in_this_sglang():
    """A renamed SGLang symbol would make HookRegistry log and skip the hook."""
    for target, _hook, _kind in HOOKS:
        module_path, attribute = target.rsplit(".", 1)
        owner = pkgutil.resolve_name(module_path)
        assert hasattr(owner, attribute), target


def test_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert "sglang_kvc.plugin:register" in names


def test_launch_server_help_lists_the_flag():
    result = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True, timeout=240, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--kv-compress CONFIG_YAML" in result.stdout


def test_bad_config_stops_the_launcher_with_the_key_and_allowed_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization:\n  key_bits: 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", MODEL, "--kv-compress", str(bad)],
        capture_output=True, text=True, timeout=240, cwd="/",
    )
    assert result.returncode != 0
    assert "--kv-compress: quantization.key_bits=5 is out of range; allowed: one of [2, 3, 4, 8]" in result.stderr
    assert "Traceback" not in result.stderr


def test_flag_sets_what_compression_needs_and_rejects_what_it_cannot_run_with():
    result = run_python(
        f"""
        import os
        os.environ.pop("SGLANG_FORCE_COARSE_WAR_BARRIER", None)
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import prepare_server_args
        base = ["--model-path", {MODEL!r}, "--device", "cpu", "--skip-tokenizer-init"]
        plain = prepare_server_args(base)
        print("PLAIN", plain.disable_overlap_schedule, plain.disable_cuda_graph)
        print("PLAIN_BARRIER", os.environ.get("SGLANG_FORCE_COARSE_WAR_BARRIER"))
        args = prepare_server_args(base + ["--kv-compress", {str(REPO / "configs/qwen_8x.yaml")!r}])
        print("KVC", args.attention_backend, args.disable_overlap_schedule, args.disable_cuda_graph, args.disable_prefill_cuda_graph)
        import os
        os.environ["SGLANG_KVC_TRITON"] = "1"
        args = prepare_server_args(base + ["--kv-compress", {str(REPO / "configs/qwen_8x.yaml")!r}])
        print("KVC_TRITON", args.disable_cuda_graph, args.disable_decode_cuda_graph, args.disable_prefill_cuda_graph)
        args = prepare_server_args(base + ["--kv-compress", {str(REPO / "configs/qwen_8x.yaml")!r}, "--disable-overlap-schedule"])
        print("KVC_NO_OVERLAP", args.disable_overlap_schedule)
        print("BARRIER", os.environ.get("SGLANG_FORCE_COARSE_WAR_BARRIER"))
        try:
            prepare_server_args(base + ["--kv-compress", {str(REPO / "configs/qwen_8x.yaml")!r}, "--page-size", "16"])
        except ValueError as exc:
            print("REJECTED", exc)
        """,
        env_extra={"SGLANG_KVC_TRITON": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(
        line.split(" ", 1)
        for line in result.stdout.splitlines()
        if line.split(" ", 1)[0] in {"PLAIN", "PLAIN_BARRIER", "KVC", "KVC_TRITON", "KVC_NO_OVERLAP", "BARRIER", "REJECTED"}
    )
    # Without the flag the plugin changes nothing (that run happened first, in the same process).
    assert lines["PLAIN"] == "False False"
    # The torch reference path decodes eagerly; the Triton path keeps SGLang's decode graphs.
    # The overlap scheduler stays as the user set it (on by default, off when asked).
    assert lines["KVC"] == "triton False True True"
    assert lines["KVC_TRITON"] == "False False True"
    assert lines["KVC_NO_OVERLAP"] == "True"
    # The decode graph's two-pass entry build must not race the scheduler's frees and seals.
    assert lines["PLAIN_BARRIER"] == "None" and lines["BARRIER"] == "True"
    assert "page_size=16 (allowed: [None, 1]" in lines["REJECTED"]


def _scheduler_with(allocator, pool, backend):
    """The three attributes of SGLang's Scheduler that the start-up check reads."""
    runner = SimpleNamespace(token_to_kv_pool=pool, attn_backend=backend)
    return SimpleNamespace(token_to_kv_pool_allocator=allocator, tp_worker=SimpleNamespace(model_runner=runner))


def test_scheduler_refuses_to_report_ready_with_stock_components(monkeypatch, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: t\n")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(config))
    stock_pool = MHATokenToKVPool(16, 1, torch.bfloat16, 2, 8, 2, "cpu", False)
    stock_allocator = TokenToKVPoolAllocator(16, torch.bfloat16, "cpu", stock_pool, False)
    scheduler = _scheduler_with(stock_allocator, stock_pool, object())
    with pytest.raises(RuntimeError, match="refusing to start uncompressed"):
        scheduler_hooks.verify_components({"status": "ready"}, scheduler)


def test_launcher_refuses_a_scheduler_that_did_not_load_the_plugin(monkeypatch, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: t\n")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(config))
    with pytest.raises(RuntimeError, match="without the sglang-kvc plugin"):
        scheduler_hooks.require_compressed_schedulers([{"status": "ready", "max_total_num_tokens": 10}])
    scheduler_hooks.require_compressed_schedulers([{"status": "ready", scheduler_hooks.INIT_INFO_KEY: {}}])
    monkeypatch.delenv(CONFIG_ENV_VAR)
    # Without --kv-compress a stock scheduler is exactly what is expected.
    scheduler_hooks.require_compressed_schedulers([{"status": "ready"}])


def test_triton_switch_rejects_other_values(monkeypatch):
    from sglang_kvc.runtime import triton_kernels_enabled

    monkeypatch.delenv("SGLANG_KVC_TRITON", raising=False)
    assert triton_kernels_enabled()  # the default since the H200 serving run
    monkeypatch.setenv("SGLANG_KVC_TRITON", "yes")
    with pytest.raises(ValueError, match="allowed: '0'"):
        triton_kernels_enabled()
