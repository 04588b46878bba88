"""`sglang-kvc plan`: the printed table and JSON carry the planner's numbers; bad input
exits with status 2 and a message naming the problem (no traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_kvc.cli import main
from sglang_kvc.config import load_config
from sglang_kvc.planner import ModelShape, RuntimeLimits, plan_for

REPO = Path(__file__).resolve().parents[1]
QWEN_CONFIG = REPO / "tests" / "data" / "qwen2.5-7b-instruct" / "config.json"
SHIPPED = ("qwen_8x", "qwen_8x_aggressive", "qwen_12x")
GIB = 2**30


def config_path(name: str) -> str:
    return str(REPO / "configs" / f"{name}.yaml")


def planner_report(name, prompt_len=32768, kv_memory_bytes=110 * GIB, limits=None):
    plan = plan_for(load_config(config_path(name)), ModelShape.from_hf_config(QWEN_CONFIG), limits)
    return plan.report(prompt_len, kv_memory_bytes)


def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["plan", *args])
    out, err = capsys.readouterr()
    return status, out, err


def printed(text: str, label: str) -> str:
    """The value printed after `label` at the start of a table row."""
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d,.]+x?)(?:\s|$)", text, re.MULTILINE)
    assert match, f"no row {label!r} in:\n{text}"
    return match.group(1)


def printed_int(text: str, label: str) -> int:
    return int(printed(text, label).replace(",", ""))


def check_table(text: str, report: dict) -> None:
    per_layer, meta, prompt = report["bytes_per_token_per_layer"], report["metadata_bytes"], report["prompt"]
    expected_ints = {
        "bf16 (uncompressed)": per_layer["bf16"],
        "low-bit row": per_layer["lowbit"],
        "codes": per_layer["lowbit_codes"],
        "scales": per_layer["lowbit_scales"],
        "guard row": per_layer["guard"],
        "staging row": per_layer["staging"],
        "location map": meta["location_map_per_token"],
        "row free list": meta["free_list_per_row"],
        "logical free list": meta["logical_free_list_per_token"],
        "staging fixed cost": meta["staging_fixed"],
        "staging rows": meta["staging_rows"],
        "bf16 KV": prompt["bf16"],
        "compressed payload": prompt["payload"],
        "compressed metadata": prompt["metadata"],
        "compressed total": prompt["compressed"],
        "logical tokens fit": report["logical_tokens_fit"],
        "bf16 tokens fit": report["bf16_tokens_fit"],
    }
    for label, value in expected_ints.items():
        assert printed_int(text, label) == value, label
    assert printed(text, "compression ratio") == f"{report['compression_ratio']:.3f}x"
    assert printed(text, "payload ratio") == f"{report['payload_compression_ratio']:.3f}x"
    assert printed(text, "capacity gain") == f"{report['capacity_gain']:.3f}x"
    assert printed(text, "bytes per logical token") == f"{report['bytes_per_logical_token']:,.1f}"
    # Every layer's retain ratio, in layer order.
    retain_rows = re.findall(r"^\s*layers \d+-\d+\s+(.*)$", text, re.MULTILINE)
    values = [float(v) for row in retain_rows for v in row.split()]
    assert values == report["layer_retain_ratios"]


@pytest.mark.parametrize("name", SHIPPED)
def test_plan_prints_the_planner_numbers(capsys, name):
    status, out, err = run_plan(capsys, config_path(name), "--model-config", str(QWEN_CONFIG))
    assert (status, err) == (0, "")
    assert out.startswith(f"sglang-kvc plan: {name}\n")
    check_table(out, planner_report(name))


@pytest.mark.parametrize("name", SHIPPED)
def test_plan_json_is_the_report(capsys, name):
    status, out, _ = run_plan(capsys, config_path(name), "--model-config", str(QWEN_CONFIG), "--json")
    assert status == 0
    assert json.loads(out) == planner_report(name)


def test_plan_options_reach_the_planner(capsys):
    args = ["--kv-memory-gb", "40.5", "--prompt-len", "9000", "--chunked-prefill-size", "4096",
            "--max-running-requests", "256"]
    limits = RuntimeLimits(chunked_prefill_size=4096, max_running_requests=256)
    expected = planner_report("qwen_8x", 9000, int(40.5 * GIB), limits)
    status, out, _ = run_plan(capsys, config_path("qwen_8x"), "--model-config", str(QWEN_CONFIG), *args)
    assert status == 0
    check_table(out, expected)
    assert "Capacity in 40.5 GiB" in out
    status, out, _ = run_plan(capsys, config_path("qwen_8x"), "--model-config", str(QWEN_CONFIG), *args, "--json")
    assert json.loads(out) == expected


def test_model_config_folder_is_accepted(capsys):
    status, out, _ = run_plan(capsys, config_path("qwen_12x"), "--model-config", str(QWEN_CONFIG.parent), "--json")
    assert status == 0 and json.loads(out) == planner_report("qwen_12x")


def test_uniform_retain_ratios_print_on_one_row(capsys, tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("sparsity:\n  retain_ratio: 0.25\n  budget: uniform\n")
    status, out, _ = run_plan(capsys, str(path), "--model-config", str(QWEN_CONFIG))
    assert status == 0
    assert re.search(r"^\s*all 28 layers\s+0\.2500$", out, re.MULTILINE)


# ---- errors ------------------------------------------------------------------------------------


def assert_usage_error(status: int, out: str, err: str, *fragments: str) -> None:
    assert status == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("sglang-kvc plan: error: ")
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


@pytest.mark.parametrize(
    "yaml_text, fragments",
    [
        ("sparsity:\n  retain_ratio: 1.5\n", ["sparsity.retain_ratio=1.5", "allowed: a number in (0, 1]"]),
        ("quantization:\n  key_bits: 5\n", ["quantization.key_bits=5", "one of [2, 3, 4, 8]"]),
        ("quantization:\n  group_size: true\n", ["quantization.group_size=True", "must be an integer"]),
        ("sparsity:\n  budget: linear\n", ["sparsity.budget='linear'", "['uniform', 'pyramid']"]),
        ("sparsity:\n  retain_ratio: 0.8\n  pyramid_slope: 0.5\n", ["sparsity.pyramid_slope", "pyramid_slope <= 0.250"]),
        ("quant:\n  key_bits: 4\n", ["unknown key quant", "['name', 'sparsity', 'quantization']"]),
        ("sparsity:\n  retain: 0.3\n", ["unknown key sparsity.retain", "retain_ratio"]),
        ("sparsity: [oops\n", ["not valid YAML"]),
    ],
)
def test_bad_config_exits_2_naming_the_key(capsys, tmp_path, yaml_text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert_usage_error(*run_plan(capsys, str(path), "--model-config", str(QWEN_CONFIG)), *fragments)


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "absent.yaml"
    result = run_plan(capsys, str(missing), "--model-config", str(QWEN_CONFIG))
    assert_usage_error(*result, "no such config file", str(missing))


def test_missing_model_config(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "config.json"
    result = run_plan(capsys, config_path("qwen_8x"), "--model-config", str(missing))
    assert_usage_error(*result, "--model-config", str(missing))


@pytest.mark.parametrize(
    "content, fragment",
    [("{not json", "not valid JSON"), (json.dumps({"hidden_size": 4096}), "num_hidden_layers")],
)
def test_unusable_model_config(capsys, tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert_usage_error(*run_plan(capsys, config_path("qwen_8x"), "--model-config", str(path)), fragment)


def test_config_that_does_not_fit_the_model(capsys, tmp_path):
    model = json.loads(QWEN_CONFIG.read_text()) | {"head_dim": 96}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(model))
    result = run_plan(capsys, config_path("qwen_12x"), "--model-config", str(path))  # group 64 vs 96
    assert_usage_error(*result, "quantization.group_size=64", "head_dim=96")


def test_budget_below_staging(capsys):
    result = run_plan(capsys, config_path("qwen_8x"), "--model-config", str(QWEN_CONFIG), "--kv-memory-gb", "5")
    assert_usage_error(*result, "does not cover the bf16 staging tier", "5.91 GiB")


@pytest.mark.parametrize(
    "args",
    [
        ["plan", config_path("qwen_8x")],  # --model-config is required
        ["plan", config_path("qwen_8x"), "--model-config", str(QWEN_CONFIG), "--prompt-len", "0"],
        ["plan", config_path("qwen_8x"), "--model-config", str(QWEN_CONFIG), "--kv-memory-gb", "-1"],
        ["plan", config_path("qwen_8x"), "--model-config", str(QWEN_CONFIG), "--max-running-requests", "x"],
        [],  # no command
    ],
)
def test_bad_command_line_exits_2(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "usage: sglang-kvc" in capsys.readouterr().err


# ---- as a process ------------------------------------------------------------------------------


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang_kvc.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_module_entry_point(tmp_path):
    done = run_module("plan", config_path("qwen_12x"), "--model-config", str(QWEN_CONFIG))
    assert done.returncode == 0, done.stderr
    check_table(done.stdout, planner_report("qwen_12x"))

    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization:\n  guard_bits: 4\n")
    done = run_module("plan", str(bad), "--model-config", str(QWEN_CONFIG))
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert "quantization.guard_bits=4" in done.stderr and "one of [8, 16]" in done.stderr
