"""Memory planner: bytes per token in every tier, and how a byte budget becomes a pool.

The same code answers `sglang-kvc plan` and sizes the pool inside SGLang (the cell-size
hook and `CompressedKVPool`), so what the planner prints is what the server allocates.

Cost model, per *logical* token (a token id SGLang hands out):
  * payload: in layer l a long prompt keeps `retain_l` of its tokens; of those a
    `guard_fraction` share is stored in the guard tier, the rest as packed low-bit rows;
  * metadata: the `[layer, token] -> (tier, row)` location map (int32 per layer),
    one int64 free-list entry per physical row, and SGLang's own int64 free-list slot.
Fixed cost: the bf16 staging tier, sized for one maximal chunked prompt, one prefill
batch and the decode window of every running request (see `staging_rows`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_kvc.config import CompressionConfig
from sglang_kvc.quant import PackedFormat
from sglang_kvc.stores import DenseStore, PackedStore

LOCATION_BYTES = 4  # int32 per layer per logical token
FREE_LIST_ENTRY_BYTES = 8  # int64, per physical row (ours) and per logical slot (SGLang's)
BF16 = torch.bfloat16


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    kv_heads: int  # per tensor-parallel rank
    head_dim: int
    context_len: int

    @classmethod
    def from_hf_config(cls, path: str | Path, tp_size: int = 1) -> "ModelShape":
        cfg = json.loads(Path(path).read_text())
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(
            num_layers=cfg["num_hidden_layers"],
            kv_heads=max(1, kv_heads // tp_size),
            head_dim=head_dim,
            context_len=cfg.get("max_position_embeddings", 32768),
        )

    def bf16_bytes_per_token(self) -> int:
        return self.num_layers * DenseStore.bytes_per_row(self.kv_heads, self.head_dim, BF16)


@dataclass(frozen=True)
class RuntimeLimits:
    """Server settings that size the staging tier."""

    chunked_prefill_size: int = 8192
    max_running_requests: int = 4096


@dataclass(frozen=True)
class PoolSizes:
    logical_tokens: int  # SGLang's max_total_num_tokens
    staging_rows: int
    lowbit_rows: tuple[int, ...]  # per layer
    guard_rows: tuple[int, ...]  # per layer
    total_bytes: int


@dataclass(frozen=True)
class KVPlan:
    config: CompressionConfig
    shape: ModelShape
    limits: RuntimeLimits

    # ---- row formats ------------------------------------------------------------------
    @property
    def key_format(self) -> PackedFormat:
        q = self.config.quantization
        return PackedFormat(q.key_bits, self.shape.head_dim, q.group_size)

    @property
    def value_format(self) -> PackedFormat:
        q = self.config.quantization
        return PackedFormat(q.value_bits, self.shape.head_dim, q.group_size)

    @property
    def guard_format(self) -> PackedFormat | None:
        """None when the guard tier is bf16."""
        q = self.config.quantization
        if q.guard_bits == 16:
            return None
        return PackedFormat(q.guard_bits, self.shape.head_dim, q.group_size)

    @property
    def lowbit_row_bytes(self) -> int:
        return PackedStore.bytes_per_row(self.shape.kv_heads, self.key_format, self.value_format)

    @property
    def guard_row_bytes(self) -> int:
        fmt = self.guard_format
        if fmt is None:
            return DenseStore.bytes_per_row(self.shape.kv_heads, self.shape.head_dim, BF16)
        return PackedStore.bytes_per_row(self.shape.kv_heads, fmt, fmt)

    @property
    def staging_row_bytes(self) -> int:
        """One staging row spans all layers (a staged token is staged in every layer)."""
        return self.shape.bf16_bytes_per_token()

    @property
    def layer_retain_ratios(self) -> list[float]:
        return self.config.layer_retain_ratios(self.shape.num_layers)

    # ---- per-token costs -------------------------------------------------------------------
    def _row_cost(self, rows: float, guard_share: float) -> float:
        payload = guard_share * self.guard_row_bytes + (1 - guard_share) * self.lowbit_row_bytes
        return rows * (payload + FREE_LIST_ENTRY_BYTES)

    def bytes_per_logical_token(self) -> float:
        """Capacity cost of one logical token (the pool's cell size)."""
        g = self.config.quantization.guard_fraction
        rows = sum(self._row_cost(r, g) for r in self.layer_retain_ratios)
        return rows + self.shape.num_layers * LOCATION_BYTES + FREE_LIST_ENTRY_BYTES

    def staging_rows(self) -> int:
        limits = self.limits
        prefill = max(limits.chunked_prefill_size, 1)
        decode = limits.max_running_requests * (self.config.quantization.decode_window + 1)
        return self.shape.context_len + prefill + decode

    def fixed_bytes(self) -> int:
        return self.staging_rows() * (self.staging_row_bytes + FREE_LIST_ENTRY_BYTES)

    # ---- sizing a pool -----------------------------------------------------------------------
    def sizes_for_budget(self, budget_bytes: int) -> PoolSizes:
        usable = budget_bytes - self.fixed_bytes()
        if usable <= 0:
            raise ValueError(
                f"KV budget {budget_bytes / 2**30:.2f} GiB does not cover the bf16 staging tier "
                f"({self.fixed_bytes() / 2**30:.2f} GiB for {self.staging_rows()} rows); lower "
                f"--max-running-requests or --chunked-prefill-size, or raise --mem-fraction-static"
            )
        # The fractional per-token cost is a lower bound on what `sizes_for_tokens` allocates
        # (it rounds each layer's kept and guard rows up), so this estimate is never too
        # small but can overshoot the budget by a few rows per layer: step down until it fits.
        sizes = self.sizes_for_tokens(int(usable // self.bytes_per_logical_token()))
        while sizes.total_bytes > budget_bytes:
            sizes = self.sizes_for_tokens(sizes.logical_tokens - 1)
        return sizes

    def sizes_for_tokens(self, logical_tokens: int) -> PoolSizes:
        g = self.config.quantization.guard_fraction
        kept = [math.ceil(logical_tokens * r) for r in self.layer_retain_ratios]
        guard = tuple(math.ceil(k * g) for k in kept)
        lowbit = tuple(k - gr for k, gr in zip(kept, guard))
        total = (
            self.fixed_bytes()
            + sum(lowbit) * (self.lowbit_row_bytes + FREE_LIST_ENTRY_BYTES)
            + sum(guard) * (self.guard_row_bytes + FREE_LIST_ENTRY_BYTES)
            + logical_tokens * (self.shape.num_layers * LOCATION_BYTES + FREE_LIST_ENTRY_BYTES)
        )
        return PoolSizes(logical_tokens, self.staging_rows(), lowbit, guard, total)

    # ---- one prompt ------------------------------------------------------------------------
    def prompt_rows(self, prompt_len: int) -> list[tuple[int, int]]:
        """(guard rows, low-bit rows) a compressed prompt of `prompt_len` keeps per layer."""
        out = []
        for retain in self.layer_retain_ratios:
            budget = self.config.layer_budget(retain, prompt_len)
            guard = self.config.guard_count(budget)
            out.append((guard, budget - guard))
        return out

    def prompt_bytes(self, prompt_len: int) -> dict[str, int]:
        guard = sum(g for g, _ in self.prompt_rows(prompt_len))
        lowbit = sum(lo for _, lo in self.prompt_rows(prompt_len))
        payload = guard * self.guard_row_bytes + lowbit * self.lowbit_row_bytes
        metadata = (
            prompt_len * (self.shape.num_layers * LOCATION_BYTES + FREE_LIST_ENTRY_BYTES)
            + (guard + lowbit) * FREE_LIST_ENTRY_BYTES
        )
        return {
            "bf16": prompt_len * self.shape.bf16_bytes_per_token(),
            "payload": payload,
            "metadata": metadata,
            "compressed": payload + metadata,
            "guard_rows": guard,
            "lowbit_rows": lowbit,
        }

    def compression_ratio(self, prompt_len: int) -> float:
        b = self.prompt_bytes(prompt_len)
        return b["bf16"] / b["compressed"]

    def report(self, prompt_len: int, kv_memory_bytes: int) -> dict:
        """Everything `sglang-kvc plan` prints, as one JSON-able dict."""
        prompt = self.prompt_bytes(prompt_len)
        sizes = self.sizes_for_budget(kv_memory_bytes)
        bf16_tokens = kv_memory_bytes // self.shape.bf16_bytes_per_token()
        h = self.shape.kv_heads
        return {
            "config": self.config.name,
            "model": vars(self.shape),
            "limits": vars(self.limits),
            "bytes_per_token_per_layer": {
                "bf16": DenseStore.bytes_per_row(h, self.shape.head_dim, BF16),
                "lowbit": self.lowbit_row_bytes,
                "lowbit_codes": h * (self.key_format.words + self.value_format.words) * 4,
                "lowbit_scales": h * (self.key_format.groups + self.value_format.groups) * 4,
                "guard": self.guard_row_bytes,
                "staging": DenseStore.bytes_per_row(h, self.shape.head_dim, BF16),
            },
            "metadata_bytes": {
                "location_map_per_token": self.shape.num_layers * LOCATION_BYTES,
                "free_list_per_row": FREE_LIST_ENTRY_BYTES,
                "logical_free_list_per_token": FREE_LIST_ENTRY_BYTES,
                "staging_fixed": self.fixed_bytes(),
                "staging_rows": self.staging_rows(),
            },
            "layer_retain_ratios": [round(r, 4) for r in self.layer_retain_ratios],
            "prompt_len": prompt_len,
            "prompt": prompt,
            "compression_ratio": prompt["bf16"] / prompt["compressed"],
            "payload_compression_ratio": prompt["bf16"] / max(1, prompt["payload"]),
            "bytes_per_logical_token": self.bytes_per_logical_token(),
            "kv_memory_bytes": kv_memory_bytes,
            "logical_tokens_fit": sizes.logical_tokens,
            "bf16_tokens_fit": int(bf16_tokens),
            "capacity_gain": sizes.logical_tokens / max(1, bf16_tokens),
        }


def plan_for(config: CompressionConfig, shape: ModelShape, limits: RuntimeLimits | None = None) -> KVPlan:
    config.validate_for_model(shape.head_dim)
    return KVPlan(config, shape, limits or RuntimeLimits())
