"""Typed config: the shipped YAML files, validation messages, and the derived per-layer policy."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_kvc.config import (
    CompressionConfig,
    ConfigError,
    QuantizationConfig,
    SparsityConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The seed report's presets: (retain_ratio, key_bits, value_bits, guard_fraction, group_size).
SEED_VALUES = {
    "qwen_8x": (0.32, 3, 2, 0.6, 32),
    "qwen_8x_aggressive": (0.18, 2, 2, 0.5, 32),
    "qwen_12x": (0.12, 2, 2, 0.4, 64),
}


def valid_raw() -> dict:
    """A complete, valid config as YAML would give it (every key present)."""
    return yaml.safe_load((CONFIGS / "qwen_8x.yaml").read_text())


def with_value(key: str, value) -> dict:
    raw = copy.deepcopy(valid_raw())
    section, name = key.split(".")
    raw[section][name] = value
    return raw


def assert_config_error(raw, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---- shipped files -----------------------------------------------------------------------------


# The tuned presets (from the tiny-model sweep) must reach their name's ratio by the planner.
TUNED_TARGETS = {"qwen_5x_tuned": 5.0, "qwen_8x_tuned": 8.0, "qwen_12x_tuned": 12.0}


def test_every_shipped_config_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(SEED_VALUES) | set(TUNED_TARGETS)


@pytest.mark.parametrize("path", sorted((REPO / "eval" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_eval_configs_load_under_their_file_names(path):
    """The candidates and variants the results files name (a broken one would only show on a GPU call)."""
    assert load_config(path).name == path.stem


@pytest.mark.parametrize("name", sorted(TUNED_TARGETS))
def test_tuned_configs_reach_their_ratio_by_the_planner(name):
    from sglang_kvc.planner import ModelShape, plan_for

    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.name == name
    shape = ModelShape.from_hf_config(REPO / "tests" / "data" / "qwen2.5-7b-instruct" / "config.json")
    ratio = plan_for(config, shape).compression_ratio(32768)
    assert TUNED_TARGETS[name] <= ratio < TUNED_TARGETS[name] * 1.05


@pytest.mark.parametrize("name", sorted(SEED_VALUES))
def test_shipped_config_loads_with_seed_values(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    retain, key_bits, value_bits, guard, group = SEED_VALUES[name]
    assert config.name == name
    assert config.sparsity.retain_ratio == retain
    assert config.sparsity.budget == "pyramid"
    assert config.quantization.key_bits == key_bits
    assert config.quantization.value_bits == value_bits
    assert config.quantization.guard_fraction == guard
    assert config.quantization.guard_bits == 16
    assert config.quantization.group_size == group
    assert config.quantization.key_transform == "hadamard"
    # Qwen2.5-7B has head_dim 128: every shipped group size and the Hadamard rotation fit.
    config.validate_for_model(head_dim=128)


@pytest.mark.parametrize("name", sorted(SEED_VALUES))
def test_dict_round_trip(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config_from_dict(config_to_dict(config)) == config


def test_name_defaults_to_file_stem_and_sections_to_defaults(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("sparsity:\n  retain_ratio: 0.5\n")
    config = load_config(path)
    assert config.name == "tiny"
    assert config.sparsity == SparsityConfig(retain_ratio=0.5)
    assert config.quantization == QuantizationConfig()


# ---- structural errors -------------------------------------------------------------------------


def test_unknown_top_level_key_names_key_and_allowed():
    raw = valid_raw()
    raw["sparsty"] = {}
    assert_config_error(raw, "sparsty", "['name', 'sparsity', 'quantization']")


@pytest.mark.parametrize(
    "section, bad_key, allowed_example",
    [("sparsity", "retain", "retain_ratio"), ("quantization", "k_bits", "key_bits")],
)
def test_unknown_section_key_names_key_and_allowed(section, bad_key, allowed_example):
    raw = valid_raw()
    raw[section][bad_key] = 1
    message = assert_config_error(raw, f"{section}.{bad_key}", allowed_example)
    # The allowed list is the whole section, not just a hint.
    cls = SparsityConfig if section == "sparsity" else QuantizationConfig
    for field in cls.__dataclass_fields__:
        assert field in message


@pytest.mark.parametrize("raw", [[1, 2], "retain_ratio: 0.3", 3])
def test_top_level_must_be_a_mapping(raw):
    assert_config_error(raw, "top level must be a mapping")


def test_section_must_be_a_mapping():
    raw = valid_raw()
    raw["quantization"] = [4, 4]
    assert_config_error(raw, "quantization must be a mapping")


# ---- wrong types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, expected",
    [
        # YAML `true` is a bool, and bool is a subclass of int in Python: must still fail.
        ("sparsity.sink_tokens", True, "must be an integer"),
        ("quantization.key_bits", False, "must be an integer"),
        ("quantization.group_size", 32.0, "must be an integer"),
        ("sparsity.observation_window", "32", "must be an integer"),
        ("sparsity.retain_ratio", True, "must be a number"),
        ("sparsity.retain_ratio", "0.3", "must be a number"),
        ("sparsity.temperature", "hot", "must be a number"),
        ("quantization.guard_fraction", None, "must be a number"),
        ("sparsity.temperature", float("nan"), "must be a finite number"),
        ("sparsity.retain_ratio", float("inf"), "must be a finite number"),
    ],
)
def test_wrong_type_names_key_and_expected_type(key, value, expected):
    assert_config_error(with_value(key, value), f"{key}=", expected)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("sparsity.budget", "linear", "['uniform', 'pyramid']"),
        ("sparsity.budget", 1, "['uniform', 'pyramid']"),
        ("quantization.key_transform", "rotate", "['none', 'hadamard']"),
        ("sparsity.scoring", "snapkv", "['window', 'context']"),
        ("sparsity.scoring", "Context", "['window', 'context']"),
        ("sparsity.scoring", None, "['window', 'context']"),
    ],
)
def test_literal_names_key_and_allowed_values(key, value, allowed):
    assert_config_error(with_value(key, value), key, allowed)


def test_scoring_defaults_to_window_and_accepts_context(tmp_path):
    """Every shipped YAML (none sets the key) keeps today's window scoring; `context`
    loads from a file and survives the dict round trip."""
    for path in CONFIGS.glob("*.yaml"):
        assert "scoring" not in yaml.safe_load(path.read_text())["sparsity"]
        assert load_config(path).sparsity.scoring == "window"
    raw = valid_raw()
    raw["sparsity"]["scoring"] = "context"
    path = tmp_path / "context.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    assert config.sparsity.scoring == "context"
    assert config_from_dict(config_to_dict(config)) == config
    assert config_from_dict(with_value("sparsity.scoring", "window")).sparsity.scoring == "window"


def test_name_must_be_a_string():
    raw = valid_raw()
    raw["name"] = 8
    assert_config_error(raw, "name=8", "must be a string")


def test_integer_is_accepted_for_a_float_field():
    config = config_from_dict(with_value("sparsity.temperature", 2))
    assert config.sparsity.temperature == 2.0 and isinstance(config.sparsity.temperature, float)


# ---- ranges ------------------------------------------------------------------------------------

# (key, rejected value, accepted boundary value, allowed description in the message).
RANGES = [
    ("sparsity.retain_ratio", 0.0, 0.001, "(0, 1]"),
    ("sparsity.retain_ratio", 1.01, 0.66, "(0, 1]"),  # 0.66 * (1 + 0.5) <= 1 for the pyramid
    ("sparsity.pyramid_slope", 1.0, 0.0, "[0, 1)"),
    ("sparsity.pyramid_slope", -0.1, 0.0, "[0, 1)"),
    ("sparsity.observation_window", 0, 1, "[1, 1024]"),
    ("sparsity.observation_window", 1025, 1024, "[1, 1024]"),
    ("sparsity.sink_tokens", -1, 0, "[0, 1024]"),
    ("sparsity.recent_window", 8193, 8192, "[0, 8192]"),
    ("sparsity.pooling_kernel", 4, 1, "odd integer in [1, 63]"),
    ("sparsity.pooling_kernel", 65, 63, "odd integer in [1, 63]"),
    ("sparsity.temperature", 0.0, 100.0, "(0, 100]"),
    ("sparsity.min_prompt_len", -1, 0, ">= 0"),
    ("quantization.key_bits", 5, 8, "[2, 3, 4, 8]"),
    ("quantization.value_bits", 1, 2, "[2, 3, 4, 8]"),
    ("quantization.group_size", 48, 128, "[16, 32, 64, 128]"),
    ("quantization.guard_fraction", 1.01, 1.0, "[0, 1]"),
    ("quantization.guard_bits", 4, 8, "[8, 16]"),
    ("quantization.decode_window", 1025, 0, "[0, 1024]"),
]


@pytest.mark.parametrize("key, bad, good, allowed", RANGES)
def test_out_of_range_names_key_and_allowed_values(key, bad, good, allowed):
    assert_config_error(with_value(key, bad), f"{key}={bad!r}", "out of range", allowed)
    section, name = key.split(".")
    assert getattr(getattr(config_from_dict(with_value(key, good)), section), name) == good


@settings(max_examples=200, deadline=None)
@given(
    retain=st.floats(0.01, 1.0),
    slope=st.floats(0.0, 0.99),
)
def test_pyramid_slope_too_large_is_rejected_exactly_when_layer0_exceeds_one(retain, slope):
    raw = valid_raw()
    raw["sparsity"].update(retain_ratio=retain, pyramid_slope=slope, budget="pyramid")
    if retain * (1.0 + slope) > 1.0:
        message = assert_config_error(raw, "sparsity.pyramid_slope", "allowed: pyramid_slope <=")
        limit = float(re.search(r"pyramid_slope <= ([0-9.]+)", message).group(1))
        assert limit == pytest.approx(1.0 / retain - 1.0, abs=1e-3)
    else:
        config_from_dict(raw)
    # A uniform budget never asks any layer for more than retain_ratio <= 1.
    raw["sparsity"]["budget"] = "uniform"
    config_from_dict(raw)


@pytest.mark.parametrize(
    "quant, head_dim, fragments",
    [
        ({"group_size": 128}, 96, ["quantization.group_size=128", "head_dim=96", "[16, 32]"]),
        ({"group_size": 32, "key_transform": "hadamard"}, 96, ["key_transform", "power-of-two", "['none']"]),
    ],
)
def test_validate_for_model(quant, head_dim, fragments):
    config = CompressionConfig(quantization=QuantizationConfig(**quant))
    with pytest.raises(ConfigError) as info:
        config.validate_for_model(head_dim)
    for fragment in fragments:
        assert fragment in str(info.value)


# ---- files -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("sparsity: [retain_ratio: 0.3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_error_from_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("quantization:\n  key_bits: 5\n")
    with pytest.raises(ConfigError, match=re.escape("quantization.key_bits=5 is out of range; allowed: one of [2, 3, 4, 8]")):
        load_config(path)


# ---- derived per-layer policy ------------------------------------------------------------------


def make_config(**sparsity) -> CompressionConfig:
    return CompressionConfig(sparsity=SparsityConfig(**sparsity))


@settings(max_examples=300, deadline=None)
@given(
    retain=st.floats(0.01, 1.0),
    slope_fraction=st.floats(0.0, 1.0),
    num_layers=st.integers(1, 128),
    budget=st.sampled_from(["uniform", "pyramid"]),
)
def test_layer_retain_ratios_mean_and_shape(retain, slope_fraction, num_layers, budget):
    slope = min(0.99, 1.0 / retain - 1.0) * slope_fraction  # always a valid slope
    config = make_config(retain_ratio=retain, pyramid_slope=slope, budget=budget)
    ratios = config.layer_retain_ratios(num_layers)
    assert len(ratios) == num_layers
    assert sum(ratios) / num_layers == pytest.approx(retain, rel=1e-9)
    assert all(0.0 < r <= 1.0 + 1e-12 for r in ratios)
    if budget == "uniform" or num_layers == 1:
        assert ratios == [retain] * num_layers
        return
    assert ratios[0] == pytest.approx(retain * (1 + slope), rel=1e-9)
    assert ratios[-1] == pytest.approx(retain * (1 - slope), rel=1e-9)
    steps = [b - a for a, b in zip(ratios, ratios[1:])]
    if slope > 1e-6:
        assert all(step < 0 for step in steps)  # early layers keep more
    # Linear: every step is the same.
    assert max(steps) - min(steps) <= 1e-9


@settings(max_examples=500, deadline=None)
@given(
    retain=st.floats(0.001, 1.0),
    num_candidates=st.integers(0, 200_000),
    sinks=st.integers(0, 64),
    recent=st.integers(0, 512),
    min_prompt_len=st.integers(0, 4096),
)
def test_layer_budget(retain, num_candidates, sinks, recent, min_prompt_len):
    config = make_config(
        retain_ratio=retain,
        budget="uniform",
        sink_tokens=sinks,
        recent_window=recent,
        min_prompt_len=min_prompt_len,
    )
    budget = config.layer_budget(retain, num_candidates)
    if num_candidates < min_prompt_len:
        assert budget == num_candidates  # short prompts are only quantized
        return
    assert budget <= num_candidates
    assert budget >= min(num_candidates, sinks + recent)
    if sinks + recent <= round(num_candidates * retain) <= num_candidates:
        assert budget == round(num_candidates * retain)


@pytest.mark.parametrize(
    "budget, fraction, expected", [(0, 0.6, 0), (10, 0.0, 0), (10, 1.0, 10), (10, 0.5, 5), (7, 0.4, 3)]
)
def test_guard_count(budget, fraction, expected):
    config = CompressionConfig(quantization=QuantizationConfig(guard_fraction=fraction))
    assert config.guard_count(budget) == expected
