"""Typed compression config, loaded from YAML and validated in one place.

A config has two sections, one per compression axis:

    sparsity:      which tokens each layer keeps after a prompt is prefilled
    quantization:  how the kept tokens are stored

Every error names the offending key and what is allowed, so a typo in a YAML file
fails at server start-up instead of silently running with a default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

BudgetStrategy = Literal["uniform", "pyramid"]
KeyTransform = Literal["none", "hadamard"]
ScoringMode = Literal["window", "context"]

ALLOWED_BITS = (2, 3, 4, 8)
ALLOWED_GUARD_BITS = (8, 16)
ALLOWED_GROUP_SIZES = (16, 32, 64, 128)


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class SparsityConfig:
    # Fraction of a prompt's tokens kept, averaged over layers.
    retain_ratio: float = 0.32
    # How the average is spread over layers: `pyramid` gives early layers more.
    budget: BudgetStrategy = "pyramid"
    # Pyramid only: layer 0 keeps retain*(1+slope), the last layer retain*(1-slope).
    pyramid_slope: float = 0.5
    # Number of final prompt queries whose attention scores the prompt's tokens.
    observation_window: int = 32
    # Which queries score the prompt: `window` = its last `observation_window` queries
    # (SnapKV); `context` = at most 2 * observation_window queries sampled across the whole
    # prompt at a power-of-two stride, each key scored by the mean attention it receives
    # from the sampled queries that see it (question-independent, nearly prefix-safe).
    scoring: ScoringMode = "window"
    # The first tokens of a prompt: always kept (attention sinks).
    sink_tokens: int = 4
    # The last tokens of a prompt: always kept.
    recent_window: int = 32
    # Max-pooling kernel over token scores, so neighbours of a hit survive too.
    pooling_kernel: int = 7
    # Softmax temperature of the observation-window scores (higher = flatter).
    temperature: float = 1.0
    # Prompts with fewer uncompressed tokens than this are only quantized.
    min_prompt_len: int = 256


@dataclass(frozen=True)
class QuantizationConfig:
    key_bits: int = 4
    value_bits: int = 4
    # Channels of head_dim that share one scale/zero pair.
    group_size: int = 32
    # Fraction of each layer's kept tokens (the highest scored) stored at guard_bits.
    guard_fraction: float = 0.0
    # 16 = bf16 (full precision, as MiKV keeps important tokens); 8 = 8-bit codes.
    guard_bits: int = 16
    # `hadamard`: rotate K (and Q) by an orthonormal Hadamard matrix before per-token
    # quantization, which spreads outlier channels over the whole head.
    key_transform: KeyTransform = "none"
    # Decode tokens stay in bf16 staging this many steps before they are quantized.
    decode_window: int = 16


@dataclass(frozen=True)
class CompressionConfig:
    name: str = "unnamed"
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    # ---- derived policy -------------------------------------------------------------
    def layer_retain_ratios(self, num_layers: int) -> list[float]:
        """Per-layer retain ratio; the mean over layers equals `retain_ratio`."""
        s = self.sparsity
        if s.budget == "uniform" or num_layers == 1:
            return [s.retain_ratio] * num_layers
        last = num_layers - 1
        return [
            s.retain_ratio * (1.0 + s.pyramid_slope * (1.0 - 2.0 * layer / last))
            for layer in range(num_layers)
        ]

    def layer_budget(self, layer_retain_ratio: float, num_candidates: int) -> int:
        """How many of `num_candidates` uncompressed prompt tokens a layer keeps."""
        s = self.sparsity
        if num_candidates < s.min_prompt_len:
            return num_candidates
        floor = s.sink_tokens + s.recent_window
        return min(num_candidates, max(floor, round(num_candidates * layer_retain_ratio)))

    def guard_count(self, budget: int) -> int:
        return round(budget * self.quantization.guard_fraction)

    def validate_for_model(self, head_dim: int) -> None:
        """Checks that need the model's shape (called when the pool is built)."""
        q = self.quantization
        if head_dim % q.group_size:
            raise ConfigError(
                f"quantization.group_size={q.group_size} must divide the model's "
                f"head_dim={head_dim}; allowed: "
                f"{[g for g in ALLOWED_GROUP_SIZES if head_dim % g == 0]}"
            )
        if q.key_transform == "hadamard" and head_dim & (head_dim - 1):
            raise ConfigError(
                f"quantization.key_transform='hadamard' needs a power-of-two head_dim, "
                f"the model has {head_dim}; allowed: ['none']"
            )


# ---- loading and validation ------------------------------------------------------------

_RULES: dict[str, Any] = {
    # key: (predicate, description of what is allowed)
    "sparsity.retain_ratio": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "sparsity.pyramid_slope": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "sparsity.observation_window": (lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
    "sparsity.sink_tokens": (lambda v: 0 <= v <= 1024, "an integer in [0, 1024]"),
    "sparsity.recent_window": (lambda v: 0 <= v <= 8192, "an integer in [0, 8192]"),
    "sparsity.pooling_kernel": (
        lambda v: 1 <= v <= 63 and v % 2 == 1,
        "an odd integer in [1, 63]",
    ),
    "sparsity.temperature": (lambda v: 0.0 < v <= 100.0, "a number in (0, 100]"),
    "sparsity.min_prompt_len": (lambda v: 0 <= v, "an integer >= 0"),
    "quantization.key_bits": (lambda v: v in ALLOWED_BITS, f"one of {list(ALLOWED_BITS)}"),
    "quantization.value_bits": (lambda v: v in ALLOWED_BITS, f"one of {list(ALLOWED_BITS)}"),
    "quantization.group_size": (
        lambda v: v in ALLOWED_GROUP_SIZES,
        f"one of {list(ALLOWED_GROUP_SIZES)}",
    ),
    "quantization.guard_fraction": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "quantization.guard_bits": (
        lambda v: v in ALLOWED_GUARD_BITS,
        f"one of {list(ALLOWED_GUARD_BITS)}",
    ),
    "quantization.decode_window": (lambda v: 0 <= v <= 1024, "an integer in [0, 1024]"),
}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {list(allowed)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"no type check for {annotation!r}")  # a bug in this module


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}.{unknown[0]}; allowed keys in {prefix}: {names}"
        )
    values = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{prefix}.{name}"
        rule = _RULES.get(key)
        try:
            value = _check_type(key, raw[name], hints[name])
        except ConfigError as exc:
            if rule is None:
                raise
            raise ConfigError(f"{exc}; allowed: {rule[1]}") from None
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {rule[1]}")
        values[name] = value
    return cls(**values)


def config_from_dict(raw: Any, *, source: str = "<dict>") -> CompressionConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    sections = {"name": str, "sparsity": SparsityConfig, "quantization": QuantizationConfig}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]}; allowed top-level keys: {list(sections)}"
        )
    name = _check_type("name", raw.get("name", Path(source).stem), str)
    sparsity = _build_section(SparsityConfig, raw.get("sparsity"), "sparsity")
    quantization = _build_section(QuantizationConfig, raw.get("quantization"), "quantization")
    config = CompressionConfig(name=name, sparsity=sparsity, quantization=quantization)
    _check_consistency(config)
    return config


def _check_consistency(config: CompressionConfig) -> None:
    s = config.sparsity
    if s.budget == "pyramid" and s.retain_ratio * (1.0 + s.pyramid_slope) > 1.0:
        raise ConfigError(
            f"sparsity.pyramid_slope={s.pyramid_slope} with retain_ratio={s.retain_ratio} "
            f"asks layer 0 to keep {s.retain_ratio * (1 + s.pyramid_slope):.2f} of the prompt; "
            f"allowed: pyramid_slope <= {1.0 / s.retain_ratio - 1.0:.3f} for this retain_ratio"
        )


def load_config(path: str | Path) -> CompressionConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return config_from_dict(raw, source=str(path))


def config_to_dict(config: CompressionConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
