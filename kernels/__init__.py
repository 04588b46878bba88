"""Triton kernels on the packed KV layout (importable as `sglang_kvc.kernels`; design,
bytes per token and versions: docs/kernels.md)."""

from sglang_kvc.kernels.decode_attention import (
    DecodeEntries,
    DenseTables,
    PackedTables,
    decode_attention,
    decode_attention_for_pool,
    decode_entries,
    decode_entries_torch,
    layer_tables,
)
from sglang_kvc.kernels.quantize import quantize_into, write_packed

__all__ = [
    "DecodeEntries",
    "DenseTables",
    "PackedTables",
    "decode_attention",
    "decode_attention_for_pool",
    "decode_entries",
    "decode_entries_torch",
    "layer_tables",
    "quantize_into",
    "write_packed",
]
